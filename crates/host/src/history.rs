//! The daemon's recent past, for the web console's live plots: one point per second, the last
//! [`POINTS`] seconds (10 minutes), per world (VMs and system worlds): CPU, ready and
//! throttled time as CPUs' worth over each second, exits per second (VMs), and the CPU of each
//! thread (a VM's vCPUs are its threads `wv`, which runs vCPU 0, and `vcpuN`). Kept in fixed
//! rings: a world costs at most [`POINTS`] points per series however long it runs.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Points kept per series: 10 minutes at one a second.
pub const POINTS: usize = 600;

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
            // A thread that has gone keeps its points until they age out with the others.
            let n = s.t.len();
            for q in s.threads.values_mut() {
                while q.len() > n {
                    q.pop_front();
                }
            }
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
