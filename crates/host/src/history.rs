//! The daemon's recent past, for the web console's live plots: one point per second, the last
//! [`POINTS`] seconds (10 minutes), per world (VMs and system worlds): CPU, ready and
//! throttled time as CPUs' worth over each second, exits per second (VMs), in all and by cause
//! (at most [`MAX_CAUSES`]), the bytes and operations per second of each disk and net (at most
//! [`MAX_DEVICES`]), and the CPU of each thread (a VM's vCPUs are its threads `wv`, which runs
//! vCPU 0, and `vcpuN`). Kept in fixed rings: a world costs at most [`POINTS`] points per
//! series however long it runs.
//!
//! # Memory
//!
//! Each ring holds exactly [`POINTS`] values once full: the time stamps are `u64`, every other
//! series `f32`. A world costs, per second of history, [`Series::bytes_per_second`]:
//! `8 + 4 × (3 + E + T + C + 4 × D)` bytes, where E is 1 for a VM (its exits) and 0 for a
//! system world, T its threads, C its exit causes (≤ [`MAX_CAUSES`]) and D its devices
//! (≤ [`MAX_DEVICES`]), plus a constant per series (the ring's header and name, under 100
//! bytes) that does not grow with time. A VM with one vCPU thread, the 9 causes KVM counts and
//! two devices costs 8 + 4 × (3 + 1 + 1 + 9 + 8) = 96 bytes a second: 57.6 KB for 10 minutes,
//! 5.8 MB for 100 such VMs (`the_cost_of_100_vms_is_as_stated` checks the count).

use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Points kept per series: 10 minutes at one a second.
pub const POINTS: usize = 600;

/// Exit causes kept per VM, [`OTHER_CAUSE`] included: the causes seen first keep their own
/// series, and the rates of any beyond are summed into [`OTHER_CAUSE`]. KVM counts about ten
/// (`io`, `mmio`, `halt`, `irq`, `irq_window`, `signal`, ...), and the VMM names those that
/// reach it by device and call (`vmm:io:serial`, `vmm:mmio:virtio-blk-0`, `vmm:hypercall:batch`,
/// ...); only causes that happened are kept, a handful of the VMM's for a typical guest.
pub const MAX_CAUSES: usize = 24;

/// The series that takes the exit causes beyond [`MAX_CAUSES`].
pub const OTHER_CAUSE: &str = "other";

/// Devices kept per VM: the first [`MAX_DEVICES`] seen (in the VM's order) have series, the
/// others none (`/metrics` still reports them).
pub const MAX_DEVICES: usize = 16;

/// What a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A disk: in = read (disk to guest), out = write.
    Disk,
    /// A network device: in = received by the guest, out = sent by it.
    Net,
}

/// One reading of a device's data-path counters (cumulative).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReading {
    /// Its name in the VM (a disk's id, a net's name).
    pub name: String,
    /// Disk or net.
    pub kind: DeviceKind,
    /// Bytes into the guest: read from the disk, or received.
    pub in_bytes: u64,
    /// Operations that brought them: reads, or frames received.
    pub in_ops: u64,
    /// Bytes out of the guest: written to the disk, or sent.
    pub out_bytes: u64,
    /// Operations that took them: writes, or frames sent.
    pub out_ops: u64,
}

/// One reading of a world's counters (cumulative, ns and counts).
#[derive(Clone, Debug, Default)]
pub struct Reading {
    /// World id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// CPU time, ns.
    pub cpu_ns: u64,
    /// Ready time, ns.
    pub ready_ns: u64,
    /// Throttled time, ns.
    pub throttled_ns: u64,
    /// VM exits, all vCPUs (None for a system world).
    pub exits: Option<u64>,
    /// CPU time per thread name, ns.
    pub threads: Vec<(String, u64)>,
    /// VM exits by cause, all vCPUs (KVM's `*_exits` counters, by the name before `_exits`).
    pub exit_causes: Vec<(String, u64)>,
    /// The VM's disks and nets.
    pub devices: Vec<DeviceReading>,
}

/// The series of one device, per second (`null` where a reading was missing).
#[derive(Serialize, Debug, Clone)]
pub struct DeviceSeries {
    /// Its name in the VM.
    pub name: String,
    /// Disk or net.
    pub kind: DeviceKind,
    /// Bytes into the guest per second (disk reads, frames received).
    pub in_bytes: VecDeque<f32>,
    /// Operations per second that brought them.
    pub in_ops: VecDeque<f32>,
    /// Bytes out of the guest per second (disk writes, frames sent).
    pub out_bytes: VecDeque<f32>,
    /// Operations per second that took them.
    pub out_ops: VecDeque<f32>,
}

/// The series of one world, as served (`GET /v1/history`).
#[derive(Serialize, Debug, Default, Clone)]
pub struct Series {
    /// World id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Seconds since the epoch of each point.
    pub t: VecDeque<u64>,
    /// CPUs used over the second before each point.
    pub cpu: VecDeque<f32>,
    /// CPUs' worth of time runnable but waiting.
    pub ready: VecDeque<f32>,
    /// CPUs' worth of time held back by the world's limit.
    pub throttled: VecDeque<f32>,
    /// VM exits per second (empty for a system world).
    pub exits: VecDeque<f32>,
    /// CPUs used per thread (vCPU), by thread name.
    pub threads: BTreeMap<String, VecDeque<f32>>,
    /// VM exits per second by cause (only the causes that happened; `null` where a reading
    /// was missing). Every series ends at the last point: one that began later is shorter.
    pub exit_causes: BTreeMap<String, VecDeque<f32>>,
    /// Per device, in the VM's order (devices begin and end as series of causes do).
    pub devices: Vec<DeviceSeries>,
}

impl Series {
    /// Bytes of history this world costs per second, from the series it has now (see the
    /// module's documentation): a time stamp and every `f32` series' point.
    pub fn bytes_per_second(&self) -> usize {
        let f32s = 3
            + usize::from(!self.exits.is_empty())
            + self.threads.len()
            + self.exit_causes.len()
            + 4 * self.devices.len();
        std::mem::size_of::<u64>() + std::mem::size_of::<f32>() * f32s
    }

    /// Bytes its rings hold on the heap now (their capacities).
    pub fn ring_bytes(&self) -> usize {
        let f = |q: &VecDeque<f32>| q.capacity() * std::mem::size_of::<f32>();
        self.t.capacity() * std::mem::size_of::<u64>()
            + [&self.cpu, &self.ready, &self.throttled, &self.exits]
                .into_iter()
                .map(f)
                .sum::<usize>()
            + self.threads.values().map(f).sum::<usize>()
            + self.exit_causes.values().map(f).sum::<usize>()
            + self
                .devices
                .iter()
                .map(|d| f(&d.in_bytes) + f(&d.in_ops) + f(&d.out_bytes) + f(&d.out_ops))
                .sum::<usize>()
    }
}

/// Every world's series and the last reading they were computed from.
#[derive(Default)]
pub struct History {
    series: HashMap<u64, Series>,
    last: HashMap<u64, (std::time::Instant, Reading)>,
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.capacity() == 0 {
        // Exactly the ring's size: growing by doubling would end at 1024 slots for 600 points.
        q.reserve_exact(POINTS);
    }
    if q.len() == POINTS {
        q.pop_front();
    }
    q.push_back(v);
}

/// `now - before` over `dt` seconds, as a rate (0 when a counter went back: a new VMM).
#[allow(clippy::cast_possible_truncation)] // a rate, plotted
fn rate(now: u64, before: u64, scale: f64, dt: f64) -> f32 {
    (now.saturating_sub(before) as f64 / scale / dt) as f32
}

/// One point per exit cause of `s` from `r` (rates against `before`): the causes kept get
/// their rate, those beyond [`MAX_CAUSES`] add theirs to [`OTHER_CAUSE`], and a kept cause
/// missing from `r` gets a gap (NaN, served as `null`).
fn record_causes(s: &mut Series, r: &Reading, before: &Reading, dt: f64) {
    let mut point: BTreeMap<String, f32> = BTreeMap::new();
    for (cause, n) in r.exit_causes.iter().filter(|(_, n)| *n > 0) {
        // A counter the last reading lacked (it could not be read then) counts from now.
        let b = before
            .exit_causes
            .iter()
            .find(|(c, _)| c == cause)
            .map_or(*n, |(_, b)| *b);
        let named = s.exit_causes.keys().filter(|k| *k != OTHER_CAUSE).count();
        let own =
            cause != OTHER_CAUSE && (s.exit_causes.contains_key(cause) || named < MAX_CAUSES - 1);
        let key = if own { cause.as_str() } else { OTHER_CAUSE };
        s.exit_causes.entry(key.to_string()).or_default();
        *point.entry(key.to_string()).or_default() += rate(*n, b, 1.0, dt);
    }
    for (cause, q) in &mut s.exit_causes {
        push(q, point.get(cause).copied().unwrap_or(f32::NAN));
    }
}

/// One point per device of `s` from `r`: the first [`MAX_DEVICES`] have series, a device
/// missing from `r` gets a gap.
fn record_devices(s: &mut Series, r: &Reading, before: &Reading, dt: f64) {
    for d in &r.devices {
        if s.devices.len() < MAX_DEVICES && !s.devices.iter().any(|x| x.name == d.name) {
            s.devices.push(DeviceSeries {
                name: d.name.clone(),
                kind: d.kind,
                in_bytes: VecDeque::new(),
                in_ops: VecDeque::new(),
                out_bytes: VecDeque::new(),
                out_ops: VecDeque::new(),
            });
        }
    }
    for ds in &mut s.devices {
        let now = r.devices.iter().find(|d| d.name == ds.name);
        // A device seen for the first time has no rate yet: it counts from its first reading.
        let b = before.devices.iter().find(|d| d.name == ds.name).or(now);
        let (v, kind) = match (now, b) {
            (Some(n), Some(b)) => (
                [
                    rate(n.in_bytes, b.in_bytes, 1.0, dt),
                    rate(n.in_ops, b.in_ops, 1.0, dt),
                    rate(n.out_bytes, b.out_bytes, 1.0, dt),
                    rate(n.out_ops, b.out_ops, 1.0, dt),
                ],
                n.kind,
            ),
            _ => ([f32::NAN; 4], ds.kind),
        };
        ds.kind = kind;
        push(&mut ds.in_bytes, v[0]);
        push(&mut ds.in_ops, v[1]);
        push(&mut ds.out_bytes, v[2]);
        push(&mut ds.out_ops, v[3]);
    }
}

impl History {
    /// Adds one point per world from `readings` taken at `now` (seconds since the epoch);
    /// worlds not in `readings` (not running) are forgotten.
    pub fn record(&mut self, now: u64, at: std::time::Instant, readings: Vec<Reading>) {
        let ids: Vec<u64> = readings.iter().map(|r| r.id).collect();
        self.series.retain(|id, _| ids.contains(id));
        self.last.retain(|id, _| ids.contains(id));
        for r in readings {
            let Some((then, before)) = self.last.insert(r.id, (at, r.clone())) else {
                continue;
            };
            let dt = at.duration_since(then).as_secs_f64();
            if dt <= 0.0 {
                continue;
            }
            let s = self.series.entry(r.id).or_insert_with(|| Series {
                id: r.id,
                name: r.name.clone(),
                ..Series::default()
            });
            s.name.clone_from(&r.name);
            push(&mut s.t, now);
            push(&mut s.cpu, rate(r.cpu_ns, before.cpu_ns, 1e9, dt));
            push(&mut s.ready, rate(r.ready_ns, before.ready_ns, 1e9, dt));
            push(
                &mut s.throttled,
                rate(r.throttled_ns, before.throttled_ns, 1e9, dt),
            );
            if let (Some(e), Some(b)) = (r.exits, before.exits) {
                push(&mut s.exits, rate(e, b, 1.0, dt));
            }
            for (name, ns) in &r.threads {
                let b = before
                    .threads
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(*ns, |(_, b)| *b);
                let q = s.threads.entry(name.clone()).or_default();
                push(q, rate(*ns, b, 1e9, dt));
            }
            record_causes(s, &r, &before, dt);
            record_devices(s, &r, &before, dt);
            // A thread, cause or device that has gone keeps its points until they age out
            // with the others.
            let n = s.t.len();
            let trim = |q: &mut VecDeque<f32>| {
                while q.len() > n {
                    q.pop_front();
                }
            };
            s.threads.values_mut().for_each(trim);
            s.exit_causes.values_mut().for_each(trim);
            s.devices.retain_mut(|d| {
                for q in [
                    &mut d.in_bytes,
                    &mut d.in_ops,
                    &mut d.out_bytes,
                    &mut d.out_ops,
                ] {
                    trim(q);
                }
                d.in_bytes.iter().any(|v| !v.is_nan())
            });
            s.exit_causes.retain(|_, q| q.iter().any(|v| !v.is_nan()));
        }
    }

    /// Every world's series, by id.
    pub fn all(&self) -> Vec<&Series> {
        let mut v: Vec<&Series> = self.series.values().collect();
        v.sort_by_key(|s| s.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn reading(id: u64, cpu_s: f64, exits: u64) -> Reading {
        #[allow(clippy::cast_possible_truncation)]
        let ns = (cpu_s * 1e9) as u64;
        Reading {
            id,
            name: format!("w{id}"),
            cpu_ns: ns,
            ready_ns: ns / 2,
            throttled_ns: 0,
            exits: Some(exits),
            threads: vec![("vcpu1".into(), ns)],
            exit_causes: Vec::new(),
            devices: Vec::new(),
        }
    }

    fn device(name: &str, kind: DeviceKind, n: u64) -> DeviceReading {
        DeviceReading {
            name: name.into(),
            kind,
            in_bytes: 4096 * n,
            in_ops: n,
            out_bytes: 512 * n,
            out_ops: 2 * n,
        }
    }

    #[test]
    fn points_are_rates_and_the_ring_is_bounded() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.record(100, t0, vec![reading(2, 0.0, 0)]);
        assert!(h.all().is_empty(), "one reading makes no rate yet");
        for i in 1..=(POINTS as u64 + 5) {
            let at = t0 + Duration::from_secs(i);
            #[allow(clippy::cast_precision_loss)]
            let cpu = 0.5 * i as f64;
            h.record(100 + i, at, vec![reading(2, cpu, 1000 * i)]);
        }
        let s = h.all()[0];
        assert_eq!(s.t.len(), POINTS);
        assert_eq!(s.t.back(), Some(&(100 + POINTS as u64 + 5)));
        assert!(
            (s.cpu.back().unwrap() - 0.5).abs() < 1e-3,
            "{:?}",
            s.cpu.back()
        );
        assert!((s.ready.back().unwrap() - 0.25).abs() < 1e-3);
        assert!((s.exits.back().unwrap() - 1000.0).abs() < 1e-3);
        assert_eq!(s.threads["vcpu1"].len(), POINTS);
        // A world that stopped running is forgotten.
        h.record(999, t0 + Duration::from_secs(1000), vec![]);
        assert!(h.all().is_empty());
    }

    #[test]
    fn exits_by_cause_are_rates_and_their_number_is_bounded() {
        let mut h = History::default();
        let t0 = Instant::now();
        // 28 causes, cause k doing k exits a second, and one that never happens.
        let causes = |i: u64| {
            let mut c: Vec<(String, u64)> = (1..=28).map(|k| (format!("c{k:02}"), k * i)).collect();
            c.push(("never".into(), 0));
            c
        };
        for i in 0..=5u64 {
            let mut r = reading(2, 0.0, 0);
            r.exit_causes = causes(i);
            h.record(i, t0 + Duration::from_secs(i), vec![r]);
        }
        let s = h.all()[0];
        assert_eq!(
            s.exit_causes.len(),
            MAX_CAUSES,
            "{:?}",
            s.exit_causes.keys()
        );
        assert!(
            !s.exit_causes.contains_key("never"),
            "only causes that happened"
        );
        // The first 23 (in name order) have their own series; the 5 others are summed.
        assert_eq!(s.exit_causes["c01"].back(), Some(&1.0));
        assert_eq!(s.exit_causes["c23"].back(), Some(&23.0));
        assert!(!s.exit_causes.contains_key("c24"));
        assert_eq!(
            s.exit_causes[OTHER_CAUSE].back(),
            Some(&(24.0 + 25.0 + 26.0 + 27.0 + 28.0))
        );
        assert!(s.exit_causes.values().all(|q| q.len() == s.t.len()));
        // A reading without the causes (they could not be read): a gap, served as null.
        h.record(6, t0 + Duration::from_secs(6), vec![reading(2, 0.0, 0)]);
        let s = h.all()[0];
        assert!(s.exit_causes["c01"].back().unwrap().is_nan());
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(
            json["exit_causes"]["c01"][5],
            serde_json::Value::Null,
            "{json}"
        );
        assert_eq!(json["exit_causes"]["c01"][4], 1.0);
    }

    #[test]
    fn devices_have_rates_gaps_and_a_bound() {
        let mut h = History::default();
        let t0 = Instant::now();
        let devices = |n: u64, count: usize| -> Vec<DeviceReading> {
            (0..count)
                .map(|k| device(&format!("d{k:02}"), DeviceKind::Disk, n))
                .chain(std::iter::once(device("lan", DeviceKind::Net, 10 * n)))
                .collect()
        };
        for i in 0..=3u64 {
            let mut r = reading(2, 0.0, 0);
            r.devices = devices(i, 20);
            h.record(i, t0 + Duration::from_secs(i), vec![r]);
        }
        let s = h.all()[0];
        assert_eq!(s.devices.len(), MAX_DEVICES);
        assert!(
            s.devices.iter().all(|d| d.kind == DeviceKind::Disk),
            "the first 16 seen"
        );
        let d = &s.devices[0];
        assert_eq!(d.in_bytes.back(), Some(&4096.0));
        assert_eq!(d.in_ops.back(), Some(&1.0));
        assert_eq!(d.out_bytes.back(), Some(&512.0));
        assert_eq!(d.out_ops.back(), Some(&2.0));
        assert_eq!(d.in_bytes.len(), s.t.len());
        // One device fewer: the others go on, the missing one has a gap.
        let mut r = reading(2, 0.0, 0);
        r.devices = devices(5, 20);
        r.devices.remove(3);
        h.record(4, t0 + Duration::from_secs(4), vec![r]);
        let s = h.all()[0];
        assert_eq!(
            s.devices[0].in_ops.back(),
            Some(&2.0),
            "(5 - 3) reads over a second"
        );
        assert!(s.devices[3].in_ops.back().unwrap().is_nan());
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["devices"][0]["kind"], "disk");
        assert_eq!(json["devices"][3]["in_ops"][3], serde_json::Value::Null);
    }

    #[allow(clippy::cast_precision_loss)]
    /// What 10 minutes of history cost: the rings' bytes for 100 VMs of one vCPU thread, nine
    /// exit causes and two devices, against the module's formula (96 bytes a second each).
    #[test]
    fn the_cost_of_100_vms_is_as_stated() {
        let mut h = History::default();
        let t0 = Instant::now();
        for i in 0..=(POINTS as u64) {
            let rs = (2..102)
                .map(|id| {
                    let mut r = reading(id, 0.1 * i as f64, i);
                    r.exit_causes = (0..9).map(|k| (format!("c{k}"), i + k)).collect();
                    r.devices = vec![
                        device("disk0", DeviceKind::Disk, i),
                        device("net0", DeviceKind::Net, i),
                    ];
                    r
                })
                .collect();
            h.record(i, t0 + Duration::from_secs(i), rs);
        }
        let all = h.all();
        assert_eq!(all.len(), 100);
        assert!(all.iter().all(|s| s.bytes_per_second() == 96));
        let bytes: usize = all.iter().map(|s| s.ring_bytes()).sum();
        assert_eq!(bytes, 100 * POINTS * 96, "rings of exactly POINTS values");
        eprintln!(
            "history: {} bytes for 10 minutes of 100 VMs ({} per VM per second)",
            bytes,
            all[0].bytes_per_second()
        );
    }

    #[test]
    fn the_cost_of_100_worlds_is_bounded() {
        let mut h = History::default();
        let t0 = Instant::now();
        for i in 0..=(POINTS as u64) {
            let at = t0 + Duration::from_secs(i);
            let rs = (2..102).map(|id| reading(id, 0.1, i)).collect();
            h.record(i, at, rs);
        }
        let points: usize = h
            .all()
            .iter()
            .map(|s| s.t.len() + s.cpu.len() + s.ready.len() + s.exits.len())
            .sum();
        assert_eq!(points, 100 * 4 * POINTS);
    }
}
