//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4), and the live
//! per-VM readings only this endpoint takes: KVM's per-vCPU exit counters, read from the
//! running VMM through duplicates of the statistics descriptors it keeps open for this, and
//! the guest-mode CPU time of the VMM process, and the bytes and operations of each VM's disks
//! and nets as their servers report them (the VMM's `GET /vm/counters`, the switch's and the
//! storage service's `stats`), read into [`DeviceReading`]s here (the web console's history
//! takes the same readings). What the daemon knows of every world (CPU, ready and throttled
//! time, state, shares, entitlement) is gathered by [`crate::api`] and written here.

use crate::history::{DeviceKind, DeviceReading};
use serde_json::Value;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Devices read from one VMM's answer at most (a VM has at most 32 PCI slots).
const MAX_VMM_DEVICES: usize = 32;
/// Longest device name kept (longer ones are cut, on a character boundary).
const MAX_NAME: usize = 64;

/// A name from a VMM's answer taken as it is: short and printable.
fn plain(s: &str) -> bool {
    s.len() <= MAX_NAME && s.chars().all(|c| c.is_ascii_graphic())
}

fn counter(v: &Value, field: &str) -> Option<u64> {
    v.get(field)?.as_u64()
}

fn short_name(n: &str) -> String {
    let mut end = n.len().min(MAX_NAME);
    while !n.is_char_boundary(end) {
        end -= 1;
    }
    n[..end].to_string()
}

/// The prefix of the VMM's own exit causes among KVM's in the history (`vmm:io:serial`).
pub const VMM_CAUSE: &str = "vmm:";

/// At most this many of the VMM's exit causes are taken from one answer.
const MAX_VMM_CAUSES: usize = 128;

/// The exits that reached the VMM by its own causes (`exits_by_cause` of its `GET
/// /vm/counters`); a cause's name is kept only if it is short and printable.
pub fn vmm_exits(counters: &Value) -> Vec<(String, u64)> {
    let Some(by) = counters.get("exits_by_cause").and_then(Value::as_object) else {
        return Vec::new();
    };
    by.iter()
        .filter(|(k, _)| plain(k))
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .take(MAX_VMM_CAUSES)
        .collect()
}

/// The ids of the hot-plugged devices a VMM has now (`hotplugged` of its `GET /vm/counters`),
/// if it said; at most 64, each short and printable, else none are taken.
pub fn vmm_hotplugged(counters: &Value) -> Option<Vec<String>> {
    let ids = counters.get("hotplugged")?.as_array()?;
    if ids.len() > 64 {
        return None;
    }
    ids.iter()
        .map(|v| v.as_str().filter(|s| plain(s)).map(str::to_string))
        .collect()
}

/// The disks and nets a VMM serves itself, from its `GET /vm/counters` answer: each device
/// with an `io` object (docs/vmm-openapi.json, `DeviceIo`), named by what follows the `:` of
/// its accounting name (`virtio-blk:root` is `root`). A device whose entry is not as
/// documented is left out: the answer comes from a process a guest may have subverted.
pub fn vmm_devices(counters: &Value) -> Vec<DeviceReading> {
    let Some(devices) = counters.get("devices").and_then(Value::as_array) else {
        return Vec::new();
    };
    devices
        .iter()
        .take(MAX_VMM_DEVICES)
        .filter_map(|d| {
            let name = d.get("name")?.as_str()?;
            let name = name.split_once(':').map_or(name, |(_, n)| n);
            let io = d.get("io")?;
            let (kind, fields) = match io.get("kind")?.as_str()? {
                "disk" => (
                    DeviceKind::Disk,
                    ["read_bytes", "reads", "write_bytes", "writes"],
                ),
                "net" => (
                    DeviceKind::Net,
                    ["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"],
                ),
                _ => return None,
            };
            Some(DeviceReading {
                name: short_name(name),
                kind,
                in_bytes: counter(io, fields[0])?,
                in_ops: counter(io, fields[1])?,
                out_bytes: counter(io, fields[2])?,
                out_ops: counter(io, fields[3])?,
            })
        })
        .collect()
}

/// A net served by the daemon's switch, named `name`, from the port's entry in the switch's
/// `stats` (the port's `tx` is what its guest sent, `rx` what it was given).
pub fn switch_port(name: &str, port: &Value) -> Option<DeviceReading> {
    Some(DeviceReading {
        name: short_name(name),
        kind: DeviceKind::Net,
        in_bytes: counter(port, "rx_bytes")?,
        in_ops: counter(port, "rx_frames")?,
        out_bytes: counter(port, "tx_bytes")?,
        out_ops: counter(port, "tx_frames")?,
    })
}

/// A disk served by the daemon's storage service, named `name`, from its entry in the
/// service's `stats` (docs/STORAGE.md).
pub fn storage_disk(name: &str, disk: &Value) -> Option<DeviceReading> {
    Some(DeviceReading {
        name: short_name(name),
        kind: DeviceKind::Disk,
        in_bytes: counter(disk, "read_bytes")?,
        in_ops: counter(disk, "reads")?,
        out_bytes: counter(disk, "written_bytes")?,
        out_ops: counter(disk, "writes")?,
    })
}

/// Makes the names of `devices` unique (the VM's names may repeat: two nets on one network
/// are both named after it): a repeated name gets `#N`, N its position.
pub fn unique_names(devices: &mut [DeviceReading]) {
    for i in 1..devices.len() {
        if devices[..i].iter().any(|d| d.name == devices[i].name) {
            devices[i].name = format!("{}#{i}", devices[i].name);
        }
    }
}

/// A VM's exits from KVM's counters of its vCPUs ([`vcpu_counters`]), summed over them: all
/// (`exits`) and by cause (each `CAUSE_exits` counter, as `CAUSE`).
pub fn exit_totals(vcpus: &[(u32, Vec<(String, u64)>)]) -> (u64, Vec<(String, u64)>) {
    let mut all = 0u64;
    let mut causes: Vec<(String, u64)> = Vec::new();
    for (name, n) in vcpus.iter().flat_map(|(_, c)| c.iter()) {
        if name == "exits" {
            all = all.saturating_add(*n);
        } else if let Some(cause) = name.strip_suffix("_exits") {
            match causes.iter_mut().find(|(c, _)| c == cause) {
                Some((_, t)) => *t = t.saturating_add(*n),
                None => causes.push((cause.to_string(), *n)),
            }
        }
    }
    (all, causes)
}

/// The direction labels of a device's `in` and `out` counters: `read`/`write` for a disk,
/// `rx`/`tx` for a net.
pub fn directions(kind: DeviceKind) -> [&'static str; 2] {
    match kind {
        DeviceKind::Disk => ["read", "write"],
        DeviceKind::Net => ["rx", "tx"],
    }
}

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
///
/// A jail's keeper holds none: the jailed VMM, its child, does, through a pidfd of its own
/// opened here (and checked to name that child still).
pub fn vcpu_counters(pid: u32, pidfd: BorrowedFd<'_>) -> Vec<(u32, Vec<(String, u64)>)> {
    let vmm = crate::supervisor::vmm_process(pid);
    let own;
    let (pid, pidfd) = if vmm == pid {
        (pid, pidfd)
    } else {
        match crate::supervisor::Pidfd::open(vmm) {
            // Still the keeper's child once its pidfd is open: the pidfd names that VMM.
            Ok(fd) if crate::supervisor::vmm_process(pid) == vmm => {
                own = fd;
                (vmm, own.as_fd())
            }
            _ => return Vec::new(),
        }
    };
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
    let pid = crate::supervisor::vmm_process(pid);
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
    fn device_readings_take_only_what_is_documented() {
        let c = serde_json::json!({"state": "running", "vcpus": [], "devices": [
            {"name": "virtio-rng", "notifications": 1},
            {"name": "virtio-blk:root", "io": {"kind": "disk", "reads": 3, "read_bytes": 1536, "writes": 1, "write_bytes": 512}},
            {"name": "virtio-net:tap0", "io": {"kind": "net", "rx_frames": 2, "rx_bytes": 120, "tx_frames": 5, "tx_bytes": 700}},
            {"name": "virtio-blk:bad", "io": {"kind": "disk", "reads": -1, "read_bytes": 0, "writes": 0, "write_bytes": 0}},
            {"name": "virtio-blk:odd", "io": {"kind": "tape"}},
            {"name": 7, "io": {"kind": "net"}}
        ]});
        let d = vmm_devices(&c);
        assert_eq!(
            d,
            vec![
                DeviceReading {
                    name: "root".into(),
                    kind: DeviceKind::Disk,
                    in_bytes: 1536,
                    in_ops: 3,
                    out_bytes: 512,
                    out_ops: 1
                },
                DeviceReading {
                    name: "tap0".into(),
                    kind: DeviceKind::Net,
                    in_bytes: 120,
                    in_ops: 2,
                    out_bytes: 700,
                    out_ops: 5
                },
            ]
        );
        assert!(vmm_devices(&serde_json::json!({"devices": 3})).is_empty());
        let port = serde_json::json!({"port": "2-net0", "rx_frames": 1, "rx_bytes": 60, "tx_frames": 4, "tx_bytes": 400});
        let p = switch_port("lan", &port).unwrap();
        assert_eq!(
            (p.in_bytes, p.in_ops, p.out_bytes, p.out_ops),
            (60, 1, 400, 4)
        );
        let disk =
            serde_json::json!({"read_bytes": 4096, "reads": 1, "written_bytes": 0, "writes": 0});
        assert_eq!(storage_disk("d", &disk).unwrap().in_bytes, 4096);
        assert!(storage_disk("d", &serde_json::json!({"read_bytes": 1})).is_none());
        let mut two = vec![p.clone(), p];
        unique_names(&mut two);
        assert_eq!(
            (two[0].name.as_str(), two[1].name.as_str()),
            ("lan", "lan#1")
        );
        let long = "é".repeat(100);
        assert!(switch_port(&long, &port).unwrap().name.len() <= MAX_NAME);
    }

    #[test]
    fn exits_are_summed_over_vcpus_by_cause() {
        let c = |e, io| {
            vec![
                ("exits".to_string(), e),
                ("io_exits".to_string(), io),
                ("halt_exits".to_string(), 1),
                ("insn_emulation".to_string(), 9),
            ]
        };
        let (all, causes) = exit_totals(&[(0, c(10, 4)), (1, c(5, 2))]);
        assert_eq!(all, 15);
        assert_eq!(causes, vec![("io".to_string(), 6), ("halt".to_string(), 2)]);
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
