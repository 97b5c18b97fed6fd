//! The proportional-share scheduler: entitlements, admission control and their enforcement.
//!
//! Each world has *shares* (1-10000), a *reservation* (CPUs it is guaranteed) and an optional
//! *limit* (CPUs it never exceeds). The daemon computes every running world's entitlement by
//! water-filling: each world gets `λ·shares`, clamped between its reservation and its cap
//! (`min(limit, vcpus)`), with λ chosen so that the host's CPUs are exactly used. CPU that a
//! capped or idle world leaves is therefore redistributed by shares, never wasted.
//!
//! Enforcement uses the kernel's CFS through the `cpu` controller, cgroup v1 or v2 as the host
//! mounts it ([`crate::cgroup`]): each VM world is a cgroup under `worldvisor/` whose weight
//! (`cpu.shares` or `cpu.weight`) is proportional to its entitlement (so under full contention
//! CFS hands out exactly the entitlements, reservations included, and when worlds idle the rest
//! share by weight), and whose CFS quota is its limit. The `worldvisor` group itself gets a
//! large weight so that the host's other processes cannot eat into reservations.
//!
//! Weights are exact per CPU, but CFS's load balancer moves one-thread worlds between CPUs,
//! so the daemon also decides placement ([`crate::place`]): every 100 ms it packs the
//! entitlements onto the CPUs (first fit decreasing, the rest by McNaughton's wrap-around
//! rule), pins each world that fits in one CPU there, and time-shares a world split across
//! CPUs between them, fitted to what the host's own work leaves of each CPU so that this loss
//! falls on shares, never on reservations; `wv host --placement off` leaves placement to the
//! kernel.
//!
//! Accounting reads each VMM thread's `/proc/PID/task/TID/schedstat`: CPU time and time
//! runnable but waiting (the "ready" time of seed 000).

use serde::{Deserialize, Serialize};

/// Default shares of a world.
pub const DEFAULT_SHARES: u32 = 1000;
/// CFS period used for limits, in µs.
pub const PERIOD_US: u64 = 100_000;

/// What the scheduler needs to know of one world.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Demand {
    /// 1 to 10000.
    pub shares: u32,
    /// Guaranteed CPUs.
    pub reservation: f64,
    /// Maximum CPUs (None: as many as it has vCPUs).
    pub limit: Option<f64>,
    /// Its vCPUs: it can never use more CPUs than this.
    pub vcpus: u32,
}

impl Demand {
    fn cap(&self) -> f64 {
        let v = f64::from(self.vcpus);
        self.limit.map_or(v, |l| l.min(v))
    }
}

/// Checks one world's settings on their own.
pub fn validate(d: &Demand) -> Result<(), String> {
    if !(1..=10_000).contains(&d.shares) {
        return Err(format!("shares {} out of range 1-10000", d.shares));
    }
    let v = f64::from(d.vcpus);
    if !d.reservation.is_finite() || d.reservation < 0.0 || d.reservation > v {
        return Err(format!(
            "reservation {} out of range 0-{v} (CPUs, at most one per vCPU)",
            d.reservation
        ));
    }
    if let Some(l) = d.limit {
        if !l.is_finite() || l < 0.01 || l > v {
            return Err(format!(
                "limit {l} out of range 0.01-{v} (CPUs, at most one per vCPU)"
            ));
        }
        if l < d.reservation {
            return Err(format!(
                "limit {l} is below the reservation {}",
                d.reservation
            ));
        }
    }
    Ok(())
}

/// Admission control: can every reservation be met at once on `cpus` CPUs?
pub fn admit(running: &[Demand], cpus: f64) -> Result<(), String> {
    let total: f64 = running.iter().map(|d| d.reservation).sum();
    if total > cpus + 1e-9 {
        return Err(format!(
            "reservations would total {total:.2} CPUs but the host has {cpus}"
        ));
    }
    Ok(())
}

/// Entitlements (CPUs) of `worlds` all competing for `cpus` CPUs.
pub fn entitlements(worlds: &[Demand], cpus: f64) -> Vec<f64> {
    let alloc = |lambda: f64| -> Vec<f64> {
        worlds
            .iter()
            .map(|d| (lambda * f64::from(d.shares)).clamp(d.reservation, d.cap()))
            .collect()
    };
    let caps: f64 = worlds.iter().map(Demand::cap).sum();
    if caps <= cpus {
        return worlds.iter().map(Demand::cap).collect();
    }
    // sum(alloc(λ)) grows monotonically with λ: bisect for the λ that uses exactly `cpus`.
    let (mut lo, mut hi) = (0.0f64, cpus);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if alloc(mid).iter().sum::<f64>() < cpus {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    alloc(hi)
}

/// Feedback that corrects what CFS placement gets wrong: every tick, a world that was ready to
/// run but received less than its entitlement gets a larger weight, one that received more
/// gets a smaller one; a world that did not compete (no ready time) drifts back to its plain
/// weight, so idling never banks credit.
#[derive(Default)]
pub struct Controller {
    worlds: std::collections::HashMap<u64, Track>,
}

#[derive(Clone, Copy)]
struct Track {
    gain: f64,
    cpu_ns: u64,
    ready_ns: u64,
}

/// One world's observation for [`Controller::step`].
pub struct Sample {
    /// World id.
    pub id: u64,
    /// Its entitlement, CPUs.
    pub entitlement: f64,
    /// Its CPU and ready time so far, ns.
    pub cpu_ns: u64,
    /// Time ready but waiting so far, ns.
    pub ready_ns: u64,
}

impl Controller {
    /// The weight multiplier of world `id`.
    pub fn gain(&self, id: u64) -> f64 {
        self.worlds.get(&id).map_or(1.0, |t| t.gain)
    }

    /// Updates the gains from the worlds' use over the last `dt_ns`; forgets worlds not given.
    pub fn step(&mut self, samples: &[Sample], dt_ns: u64) {
        let mut next = std::collections::HashMap::new();
        for s in samples {
            let t = self.worlds.get(&s.id).copied().unwrap_or(Track {
                gain: 1.0,
                cpu_ns: s.cpu_ns,
                ready_ns: s.ready_ns,
            });
            let dt = dt_ns.max(1) as f64;
            let used = s.cpu_ns.saturating_sub(t.cpu_ns) as f64 / dt;
            let ready = s.ready_ns.saturating_sub(t.ready_ns) as f64 / dt;
            let mut gain = t.gain;
            if s.entitlement > 0.0 && (ready > 0.01 || used > s.entitlement) {
                let r = (s.entitlement / used.max(0.01)).sqrt();
                // At most ±5% per 100 ms tick: larger steps (±15-20% was tried) made the
                // 1 s windows oscillate without improving the 10 s error.
                gain *= r.clamp(0.95, 1.05);
            } else {
                gain = gain.powf(0.9);
            }
            next.insert(
                s.id,
                Track {
                    gain: gain.clamp(0.25, 4.0),
                    cpu_ns: s.cpu_ns,
                    ready_ns: s.ready_ns,
                },
            );
        }
        self.worlds = next;
    }
}

pub use crate::cgroup::Cgroups;

/// CPU accounting of one thread.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadTime {
    /// Thread id.
    pub tid: u32,
    /// Thread name (`wv` is the main thread, which runs vCPU 0; `vcpuN`; device threads).
    pub name: String,
    /// CPU time used, ns.
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU, ns.
    pub ready_ns: u64,
}

/// CPU and ready time summed over `threads`, ns.
pub fn totals(threads: &[ThreadTime]) -> (u64, u64) {
    threads
        .iter()
        .fold((0, 0), |(c, r), t| (c + t.cpu_ns, r + t.ready_ns))
}

/// Every thread of process `pid` (of the VMM it jails, if it is a jail's keeper:
/// [`crate::supervisor::vmm_process`]), from `/proc/PID/task/*/schedstat`.
pub fn threads(pid: u32) -> Vec<ThreadTime> {
    let pid = crate::supervisor::vmm_process(pid);
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        let (cpu_ns, ready_ns) = parse_schedstat(&stat);
        out.push(ThreadTime {
            tid,
            name: read_comm(&e.path()),
            cpu_ns,
            ready_ns,
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// How many ticks a new thread's name is read again: a VMM names its threads as it starts
/// them, so a thread seen for the first time may still carry its creator's name.
const NAME_TICKS: u32 = 10;

/// One VMM's threads as the scheduler's loop knows them.
struct Known {
    /// The process whose threads are the VM's ([`crate::supervisor::vmm_process`]), once it is
    /// settled (a jail's keeper may not have started its VMM yet).
    vmm: Option<u32>,
    /// Per thread: its name and how many more ticks it is read again.
    names: std::collections::HashMap<u32, (String, u32)>,
}

/// The scheduler loop's reader of VMM threads: each tick it reads every thread's `schedstat`
/// once, and its `comm` only for the first [`NAME_TICKS`] ticks it is seen (names are kept
/// after that), and resolves a jailed VM's VMM process once. What [`threads`] reads anew on
/// every call (for the API, which asks once a second at most) costs two reads per thread
/// and one of the command line per process: about 0.4% of a CPU at 10 ticks a second.
#[derive(Default)]
pub struct ThreadReader {
    procs: std::collections::HashMap<u32, Known>,
}

impl ThreadReader {
    /// The VMM process of VM process `pid`, as [`crate::supervisor::vmm_process`] gives it,
    /// remembered once settled.
    pub fn vmm(&mut self, pid: u32) -> u32 {
        let k = self.procs.entry(pid).or_insert_with(|| Known {
            vmm: None,
            names: std::collections::HashMap::new(),
        });
        if let Some(v) = k.vmm {
            return v;
        }
        let v = crate::supervisor::vmm_process(pid);
        // Settled: a VMM of its own (not jailed), or the jail's one child.
        let jailed = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--jail"));
        if v != pid || !jailed {
            k.vmm = Some(v);
        }
        v
    }

    /// Every thread of VM process `pid`'s VMM with its CPU and ready time now (as [`threads`]).
    pub fn read(&mut self, pid: u32) -> Vec<ThreadTime> {
        let vmm = self.vmm(pid);
        let Some(k) = self.procs.get_mut(&pid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(format!("/proc/{vmm}/task")) else {
            k.names.clear();
            return out;
        };
        let mut names = std::collections::HashMap::new();
        for e in rd.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("schedstat")) else {
                // Gone since the listing.
                continue;
            };
            let (cpu_ns, ready_ns) = parse_schedstat(&stat);
            let (name, left) = match k.names.remove(&tid) {
                Some((name, 0)) => (name, 0),
                Some((_, left)) => (read_comm(&e.path()), left - 1),
                None => (read_comm(&e.path()), NAME_TICKS),
            };
            names.insert(tid, (name.clone(), left));
            out.push(ThreadTime {
                tid,
                name,
                cpu_ns,
                ready_ns,
            });
        }
        k.names = names;
        out.sort_by_key(|t| t.tid);
        out
    }

    /// Forgets every VM process but those in `pids`.
    pub fn retain(&mut self, pids: &std::collections::HashSet<u32>) {
        self.procs.retain(|p, _| pids.contains(p));
    }
}

fn read_comm(task: &std::path::Path) -> String {
    std::fs::read_to_string(task.join("comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// CPU and ready time (ns) from a `schedstat`.
fn parse_schedstat(stat: &str) -> (u64, u64) {
    let mut f = stat
        .split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(shares: u32, reservation: f64, limit: Option<f64>, vcpus: u32) -> Demand {
        Demand {
            shares,
            reservation,
            limit,
            vcpus,
        }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn shares_split_the_host() {
        let w = [d(1000, 0.0, None, 2), d(3000, 0.0, None, 2)];
        assert!(close(&entitlements(&w, 2.0), &[0.5, 1.5]));
    }

    #[test]
    fn capped_worlds_give_their_excess_away() {
        // 1:2:4 with one vCPU each on two CPUs: the 4 is capped at one CPU, 1:2 split the other.
        let w = [
            d(1000, 0.0, None, 1),
            d(2000, 0.0, None, 1),
            d(4000, 0.0, None, 1),
        ];
        assert!(close(&entitlements(&w, 2.0), &[1.0 / 3.0, 2.0 / 3.0, 1.0]));
        // A limit is a cap too.
        let w = [d(1000, 0.0, None, 2), d(1000, 0.0, Some(0.25), 2)];
        assert!(close(&entitlements(&w, 2.0), &[1.75, 0.25]));
    }

    #[test]
    fn reservations_are_floors() {
        let w = [
            d(1, 0.8, None, 1),
            d(4000, 0.0, None, 1),
            d(4000, 0.0, None, 1),
        ];
        assert!(close(&entitlements(&w, 2.0), &[0.8, 0.6, 0.6]));
    }

    #[test]
    fn undercommitted_hosts_give_everyone_their_cap() {
        let w = [d(1, 0.0, None, 1), d(10, 0.0, Some(0.5), 4)];
        assert!(close(&entitlements(&w, 2.0), &[1.0, 0.5]));
        assert!(entitlements(&[], 2.0).is_empty());
    }

    #[test]
    fn settings_are_checked() {
        assert!(validate(&d(1000, 0.5, Some(1.0), 1)).is_ok());
        for bad in [
            d(0, 0.0, None, 1),
            d(10_001, 0.0, None, 1),
            d(1000, -0.1, None, 1),
            d(1000, 1.5, None, 1),
            d(1000, f64::NAN, None, 1),
            d(1000, 0.0, Some(0.0), 1),
            d(1000, 0.0, Some(2.0), 1),
            d(1000, 0.6, Some(0.5), 1),
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admission_control() {
        let w = [d(1, 1.0, None, 1), d(1, 0.9, None, 1)];
        assert!(admit(&w, 2.0).is_ok());
        let w = [d(1, 1.0, None, 1), d(1, 0.9, None, 1), d(1, 0.2, None, 1)];
        assert!(admit(&w, 2.0).unwrap_err().contains("2.10"));
    }

    #[test]
    fn feedback_raises_the_starved_and_lowers_the_greedy() {
        let mut c = Controller::default();
        let s = |id, e, cpu, ready| Sample {
            id,
            entitlement: e,
            cpu_ns: cpu,
            ready_ns: ready,
        };
        c.step(&[s(1, 0.9, 0, 0), s(2, 0.5, 0, 0), s(3, 0.5, 0, 0)], 1);
        // Over 100 ms: world 1 got 0.8 CPU while waiting, world 2 got 0.7, world 3 idled.
        let ms = 1_000_000;
        c.step(
            &[
                s(1, 0.9, 80 * ms, 20 * ms),
                s(2, 0.5, 70 * ms, 0),
                s(3, 0.5, 0, 0),
            ],
            100 * ms,
        );
        assert!(c.gain(1) > 1.0 && c.gain(2) < 1.0 && c.gain(3) == 1.0);
        // Forgotten worlds start again from 1.
        c.step(&[s(2, 0.5, 70 * ms, 0)], 100 * ms);
        assert_eq!(c.gain(1), 1.0);
    }

    #[test]
    fn this_process_has_thread_times() {
        let t = threads(std::process::id());
        assert!(!t.is_empty());
        assert!(t.iter().any(|t| t.cpu_ns > 0));
    }

    #[test]
    fn the_tick_reader_reads_what_threads_reads() {
        let me = std::process::id();
        let mut r = ThreadReader::default();
        assert_eq!(r.vmm(me), me);
        // A thread of a name of its own, started after the first read, is seen by name.
        let first = r.read(me);
        assert!(first.iter().any(|t| t.tid == me && t.cpu_ns > 0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (up_tx, up) = std::sync::mpsc::channel();
        let h = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                up_tx.send(()).unwrap();
                rx.recv().ok();
            })
            .unwrap();
        up.recv().unwrap();
        for _ in 0..NAME_TICKS + 2 {
            let now = r.read(me);
            let plain = threads(me);
            assert!(now.iter().any(|t| t.name == "vcpu7"));
            let names = |v: &[ThreadTime]| -> Vec<(u32, String)> {
                v.iter().map(|t| (t.tid, t.name.clone())).collect()
            };
            // Other tests' threads come and go: compare the threads both saw.
            for t in names(&now) {
                if plain.iter().any(|p| p.tid == t.0) {
                    assert!(names(&plain).contains(&t), "{t:?}");
                }
            }
        }
        tx.send(()).unwrap();
        h.join().unwrap();
        r.retain(&std::collections::HashSet::new());
        assert!(r.procs.is_empty());
    }
}
