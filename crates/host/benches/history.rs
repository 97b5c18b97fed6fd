//! The cost of the web console's history (issue 15's Measure): the heap a full 10-minute,
//! per-second history takes for 100 worlds (each with 1 and with 4 vCPU threads, 9 exit causes,
//! a disk and a net), and the time one `record` of 100 worlds takes (the daemon does one a
//! second). The rings alone are `Series::bytes_per_second` x 600 per world (the module's
//! documentation); the rest is per series, not per second.
//!
//! Run: `cargo bench -p wv-host --bench history`. Heap bytes are counted by a global
//! allocator that wraps the system's, so they are exact for this process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use wv_host::history::{DeviceKind, DeviceReading, History, Reading, POINTS};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator with the same arguments; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed through unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l` (every allocation goes there).
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn readings(worlds: u64, vcpus: u32, sec: u64) -> Vec<Reading> {
    (0..worlds)
        .map(|id| Reading {
            id,
            name: format!("vm{id}"),
            cpu_ns: sec * 100_000_000,
            ready_ns: sec * 1_000_000,
            throttled_ns: 0,
            exits: Some(sec * 5000),
            threads: (0..vcpus)
                .map(|v| {
                    let name = if v == 0 {
                        "wv".to_string()
                    } else {
                        format!("vcpu{v}")
                    };
                    (name, sec * 100_000_000)
                })
                .collect(),
            exit_causes: [
                "io",
                "mmio",
                "halt",
                "irq",
                "irq_window",
                "signal",
                "nmi_window",
                "request_irq",
                "hypercall",
            ]
            .iter()
            .map(|c| (c.to_string(), sec * 500))
            .collect(),
            devices: [("root", DeviceKind::Disk), ("lan", DeviceKind::Net)]
                .into_iter()
                .map(|(name, kind)| DeviceReading {
                    name: name.into(),
                    kind,
                    in_bytes: sec << 20,
                    in_ops: sec * 256,
                    out_bytes: sec << 19,
                    out_ops: sec * 128,
                })
                .collect(),
        })
        .collect()
}

fn main() {
    let worlds = 100;
    for vcpus in [1u32, 4] {
        let before = LIVE.load(Ordering::Relaxed);
        let mut h = History::default();
        let t0 = Instant::now();
        let mut spent = Duration::ZERO;
        let rounds = POINTS as u64 + 1;
        for sec in 0..rounds {
            let rs = readings(worlds, vcpus, sec);
            let start = Instant::now();
            h.record(sec, t0 + Duration::from_secs(sec), rs);
            spent += start.elapsed();
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        let per_record = spent / u32::try_from(rounds).unwrap_or(u32::MAX);
        println!(
            "history: {worlds} worlds x {vcpus} vCPU thread(s), {POINTS} points: heap {:.2} MiB \
             ({} bytes/world), record() of {worlds} worlds {:.1} us",
            bytes as f64 / 1048576.0,
            bytes / 100,
            per_record.as_secs_f64() * 1e6
        );
        drop(h);
    }
}
