//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4), and the live
//! per-VM readings only this endpoint takes: KVM's per-vCPU exit counters, read from the
//! running VMM through duplicates of the statistics descriptors it keeps open for this, and
//! the guest-mode CPU time of the VMM process. What the daemon knows of every world (CPU, ready and throttled time,
//! state, shares, entitlement) is gathered by [`crate::api`] and written here.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The media type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value escaped for the text format (backslash, double quote and line feed).
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A metrics document being written: each family once, with its HELP and TYPE lines and
/// then all of its samples (the format requires a family's samples to be contiguous).
#[derive(Default)]
pub struct Text {
    out: String,
}

/// One family's samples: (label pairs, value).
pub type Samples = Vec<(Vec<(&'static str, String)>, f64)>;

impl Text {
    /// Writes family `name` of `kind` (`counter` or `gauge`); nothing when it has no sample.
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: &Samples) {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(self.out, "{name}{{{}}} {}", labels.join(","), number(*v));
        }
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A sample value as the text format spells it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Nanoseconds as seconds.
pub fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// KVM's cumulative counters of each vCPU of the VMM process `pid`, by vCPU index, from the
/// `anon_inode:kvm-vcpu-stats:N` descriptors the VMM keeps open (KVM lets only the VM's own
/// process open them, anyone holding one read it). Each is duplicated into the daemon
/// (`pidfd_getfd`, which needs the right to ptrace the VMM: the daemon runs as root) just
/// long enough to read it.
///
/// `pidfd` is the daemon's own pidfd of that VMM, so a descriptor is never taken from a later
/// process that reused the pid (the duplication fails once the VMM has ended).
pub fn vcpu_counters(pid: u32, pidfd: BorrowedFd<'_>) -> Vec<(u32, Vec<(String, u64)>)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let Some(index) = link
            .to_str()
            .and_then(|l| l.strip_prefix("anon_inode:kvm-vcpu-stats:"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // SAFETY: pidfd_getfd takes a pidfd we own, a descriptor number in that process and
        // no flags, and returns a new descriptor (close-on-exec) or -1.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        let Ok(dup) = libc::c_int::try_from(dup) else {
            continue;
        };
        if dup < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
        let stats = unsafe { OwnedFd::from_raw_fd(dup) };
        // The number may have been reused for something else since the readlink.
        let same = std::fs::read_link(format!("/proc/self/fd/{dup}")).is_ok_and(|l| l == link);
        if !same {
            continue;
        }
        if let Ok(c) = wv_hypervisor::stats::read_counters(&stats) {
            out.push((index, c));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.dedup_by_key(|(i, _)| *i);
    out
}

/// CPU time the process `pid` spent in guest mode (running its vCPUs), ns, from
/// `/proc/PID/stat` (clock-tick resolution); `None` when it cannot be read.
pub fn guest_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    guest_ns_of(&stat, clock_ticks())
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Field 43 (`guest_time`) of a `/proc/PID/stat` line, in ns. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn guest_ns_of(stat: &str, ticks_per_s: u64) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(43 - 3)?.parse().ok()?;
    Some(ticks.saturating_mul(1_000_000_000 / ticks_per_s.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_whole_and_escaped() {
        let mut t = Text::default();
        t.family(
            "wv_x_total",
            "counter",
            "An example.",
            &vec![
                (vec![("world", "a\"b\\c\nd".to_string())], 1.5),
                (vec![("world", "e".to_string())], 2.0),
            ],
        );
        t.family("wv_empty", "gauge", "Nothing.", &Vec::new());
        assert_eq!(
            t.finish(),
            "# HELP wv_x_total An example.\n# TYPE wv_x_total counter\n\
             wv_x_total{world=\"a\\\"b\\\\c\\nd\"} 1.5\nwv_x_total{world=\"e\"} 2\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }

    #[test]
    fn guest_time_is_field_43() {
        // A command name with ") " in it must not shift the fields.
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[43 - 3] = "250".into();
        let line = format!("1234 (a) b) {}\n", fields.join(" "));
        assert_eq!(guest_ns_of(&line, 100), Some(2_500_000_000));
        assert_eq!(guest_ns_of("1234 (a) R 1 2", 100), None);
        assert!(guest_ns(std::process::id()).is_some());
    }

    #[test]
    fn no_vcpus_in_a_process_without_kvm() {
        let me = crate::supervisor::Pidfd::open(std::process::id()).unwrap();
        assert!(vcpu_counters(std::process::id(), me.as_fd()).is_empty());
        assert!(vcpu_counters(u32::MAX, me.as_fd()).is_empty());
    }
}
