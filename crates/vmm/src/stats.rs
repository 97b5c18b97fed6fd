//! Exit accounting: every VM exit that reaches the VMM is counted per vCPU by cause, with the
//! time spent in the VMM handling it; the time between exits is guest time (guest code plus
//! KVM's in-kernel handling). Causes are small integers fixed when the VM is built, so the hot
//! path is an array increment.
#![allow(clippy::cast_possible_truncation)] // call numbers and vCPU indices are small

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use wv_abi::{Call, CALL_COUNT};

/// Port I/O nobody answers.
pub const IO_UNASSIGNED: usize = 0;
/// MMIO nobody answers.
pub const MMIO_UNASSIGNED: usize = 1;
/// HLT reaching userspace.
pub const HLT: usize = 2;
/// Interrupt window.
pub const IRQ_WINDOW: usize = 3;
/// Shutdown (triple fault).
pub const SHUTDOWN: usize = 4;
/// KVM internal error (e.g. emulation failure).
pub const INTERNAL_ERROR: usize = 5;
/// VM entry failure.
pub const FAIL_ENTRY: usize = 6;
/// Interrupted by a signal (a kick).
pub const SIGNAL: usize = 7;
/// KVM system event.
pub const SYSTEM_EVENT: usize = 8;
/// Debug exit.
pub const DEBUG: usize = 9;
/// Anything else.
pub const OTHER: usize = 10;
/// A call-port access that named no valid block or call.
pub const HYPERCALL_INVALID: usize = 11;
/// A guest kernel-mode `int3` the host's instruction emulator could not run, whose #BP the VMM
/// injected instead (crate::emulate).
pub const EMULATED_INT3: usize = 12;
/// A guest kernel-mode `clac` the VMM completed.
pub const EMULATED_CLAC: usize = 13;
/// A guest kernel-mode `stac` the VMM completed.
pub const EMULATED_STAC: usize = 14;
/// A guest kernel-mode `popcnt` the VMM completed.
pub const EMULATED_POPCNT: usize = 15;
/// A guest kernel-mode `fwait` the VMM completed.
pub const EMULATED_FWAIT: usize = 16;
/// A guest kernel-mode `ldmxcsr` the VMM completed.
pub const EMULATED_LDMXCSR: usize = 17;
const FIXED: [&str; 18] = [
    "io:unassigned",
    "mmio:unassigned",
    "hlt",
    "irq-window",
    "shutdown",
    "internal-error",
    "fail-entry",
    "signal",
    "system-event",
    "debug",
    "other",
    "hypercall:invalid",
    "emulated:int3",
    "emulated:clac",
    "emulated:stac",
    "emulated:popcnt",
    "emulated:fwait",
    "emulated:ldmxcsr",
];

/// The causes of one VM: the fixed ones, one per port I/O device, one per call.
#[derive(Clone, Debug)]
pub struct CauseTable {
    names: Vec<String>,
    io_base: usize,
    mmio_base: usize,
    call_base: usize,
}

impl CauseTable {
    /// Causes for the port I/O devices `pio` and MMIO devices `mmio` (bus order).
    pub fn new(pio: &[&str], mmio: &[&str]) -> CauseTable {
        let mut names: Vec<String> = FIXED.iter().map(|s| s.to_string()).collect();
        let io_base = names.len();
        names.extend(pio.iter().map(|d| format!("io:{d}")));
        let mmio_base = names.len();
        names.extend(mmio.iter().map(|d| format!("mmio:{d}")));
        let call_base = names.len();
        names.extend(
            (0..CALL_COUNT)
                .map(|n| format!("hypercall:{}", Call::from_nr(n).expect("dense").name())),
        );
        CauseTable {
            names,
            io_base,
            mmio_base,
            call_base,
        }
    }
    /// The cause for port I/O device `index`.
    #[inline]
    pub fn io(&self, index: usize) -> usize {
        self.io_base + index
    }
    /// The cause for MMIO device `index`.
    #[inline]
    pub fn mmio(&self, index: usize) -> usize {
        self.mmio_base + index
    }
    /// The cause for call `c`.
    #[inline]
    pub fn call(&self, c: Call) -> usize {
        self.call_base + c as usize
    }
    /// Number of causes.
    pub fn len(&self) -> usize {
        self.names.len()
    }
    /// Whether there are none (never).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    /// Name of cause `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }
}

/// Count and VMM time for one cause on one vCPU.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CauseCount {
    /// Exits.
    pub count: u64,
    /// Nanoseconds spent in the VMM handling them.
    pub vmm_ns: u64,
}

/// One vCPU's accounting.
#[derive(Clone, Debug, Default)]
pub struct VcpuStats {
    /// vCPU index.
    pub index: u32,
    /// All exits.
    pub exits: u64,
    /// Nanoseconds inside KVM_RUN (guest code and in-kernel handling). While the vCPU runs,
    /// the time fields may hold raw clock ticks; they are nanoseconds once it has stopped.
    pub guest_ns: u64,
    /// Nanoseconds in the VMM between exits.
    pub vmm_ns: u64,
    /// By cause (indexed like the [`CauseTable`]).
    pub causes: Vec<CauseCount>,
    /// Calls performed inside batches, by call number.
    pub batched: [u64; CALL_COUNT as usize],
}

impl VcpuStats {
    /// Zeroed accounting for vCPU `index` with `causes` causes.
    pub fn new(index: u32, causes: usize) -> VcpuStats {
        VcpuStats {
            index,
            causes: vec![CauseCount::default(); causes],
            ..Default::default()
        }
    }

    /// Records one exit of `cause` that took `vmm_ns` in the VMM.
    #[inline]
    pub fn record(&mut self, cause: usize, vmm_ns: u64) {
        let c = &mut self.causes[cause];
        c.count += 1;
        c.vmm_ns += vmm_ns;
        self.vmm_ns += vmm_ns;
    }
}

/// Exit counts by cause that other threads read while the vCPUs run (the control socket's
/// `GET /vm/counters`, which the daemon plots): one row per vCPU, written by that vCPU's
/// thread only, so an exit costs a plain load and store, no locked instruction. A reader
/// sees each counter whole (an aligned 64-bit access), perhaps a few exits behind.
#[derive(Debug)]
pub struct LiveExits {
    rows: Vec<Box<[AtomicU64]>>,
}

impl LiveExits {
    /// Zeroed counters for `vcpus` vCPUs and `causes` causes.
    pub fn new(vcpus: u32, causes: usize) -> LiveExits {
        LiveExits {
            rows: (0..vcpus)
                .map(|_| (0..causes).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    /// One exit of `cause` on vCPU `vcpu`; called by that vCPU's thread only.
    #[inline]
    pub fn bump(&self, vcpu: u32, cause: usize) {
        if let Some(c) = self.rows.get(vcpu as usize).and_then(|r| r.get(cause)) {
            // Single writer: a load and a store cannot lose an increment.
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    /// Exits so far by cause name, all vCPUs together; causes with none are left out.
    pub fn totals(&self, table: &CauseTable) -> Vec<(String, u64)> {
        (0..table.len())
            .filter_map(|i| {
                let n: u64 = self
                    .rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.load(Ordering::Relaxed))
                    .sum();
                (n > 0).then(|| (table.name(i).to_string(), n))
            })
            .collect()
    }
}

/// The accounting of a whole run.
#[derive(Clone, Debug)]
pub struct VmStats {
    /// Causes.
    pub table: CauseTable,
    /// Per vCPU.
    pub vcpus: Vec<VcpuStats>,
    /// Nanoseconds from the start of `run` until the first vCPU entered the guest.
    pub setup_ns: u64,
    /// Nanoseconds the VM ran.
    pub run_ns: u64,
    /// What each device's data path did without a vCPU exit (ioeventfd notifications,
    /// irqfd interrupts).
    pub devices: Vec<DeviceActivity>,
    /// KVM's own cumulative counters per vCPU (exits handled in the kernel included); empty
    /// unless filled from [`crate::Resources::kvm_counters`].
    pub kvm: Vec<Vec<(String, u64)>>,
}

/// Notifications and interrupts of one device: they bypass the vCPU run loop (ioeventfd,
/// irqfd), so the device counts them.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DeviceActivity {
    /// Device name (the MMIO accounting name).
    pub name: String,
    /// Queue notifications received.
    pub notifications: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Descriptor chains refused (buffers outside RAM, loops, nested indirect tables).
    pub bad_chains: u64,
    /// Times an available ring was unusable (an index that jumped past the queue size).
    pub ring_errors: u64,
    /// Resets of the device by its driver.
    pub resets: u64,
    /// BAR relocations refused (onto RAM, another BAR, the ECAM window).
    pub refused_bar_moves: u64,
    /// MSI-X interrupts raised through an entry with an address outside the LAPIC window.
    pub bad_msi: u64,
    /// What its data path moved, for a device the VMM serves itself (virtio-blk, virtio-net;
    /// absent for a vhost-user device, whose backend counts it, and for the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io: Option<DeviceIo>,
}

/// Bytes and operations a device moved (cumulative), by direction.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceIo {
    /// A disk: reads (disk to guest) and writes (guest to disk) served, and their bytes.
    Disk {
        /// Read requests served.
        reads: u64,
        /// Their bytes.
        read_bytes: u64,
        /// Write requests served.
        writes: u64,
        /// Their bytes.
        write_bytes: u64,
    },
    /// A network device: frames delivered to the guest (rx) and sent by it (tx), and their
    /// bytes (Ethernet frames, without the vnet header).
    Net {
        /// Frames received by the guest.
        rx_frames: u64,
        /// Their bytes.
        rx_bytes: u64,
        /// Frames sent by the guest.
        tx_frames: u64,
        /// Their bytes.
        tx_bytes: u64,
    },
}

impl DeviceIo {
    /// A snapshot of `c`.
    pub fn read(c: &wv_virtio::IoCounters) -> DeviceIo {
        use std::sync::atomic::Ordering::Relaxed;
        match c {
            wv_virtio::IoCounters::Disk(b) => DeviceIo::Disk {
                reads: b.reads.load(Relaxed),
                read_bytes: b.read_bytes.load(Relaxed),
                writes: b.writes.load(Relaxed),
                write_bytes: b.write_bytes.load(Relaxed),
            },
            wv_virtio::IoCounters::Net(n) => DeviceIo::Net {
                rx_frames: n.rx_frames.load(Relaxed),
                rx_bytes: n.rx_bytes.load(Relaxed),
                tx_frames: n.tx_frames.load(Relaxed),
                tx_bytes: n.tx_bytes.load(Relaxed),
            },
        }
    }
}

impl DeviceActivity {
    /// A snapshot of device `name`'s counters.
    pub fn read(name: &str, c: &wv_virtio::DeviceCounters) -> DeviceActivity {
        use std::sync::atomic::Ordering::Relaxed;
        DeviceActivity {
            name: name.to_string(),
            notifications: c.notifications.load(Relaxed),
            interrupts: c.interrupts.load(Relaxed),
            bad_chains: c.bad_chains.load(Relaxed),
            ring_errors: c.ring_errors.load(Relaxed),
            resets: c.resets.load(Relaxed),
            refused_bar_moves: c.refused_bar_moves.load(Relaxed),
            bad_msi: c.bad_msi.load(Relaxed),
            io: None,
        }
    }
}

/// KVM counters shown in the table (all non-zero ones go into the JSON).
const KVM_TABLE: &[&str] = &[
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "signal_exits",
    "insn_emulation",
    "insn_emulation_fail",
];

#[derive(Serialize)]
struct JsonCause<'a> {
    cause: &'a str,
    count: u64,
    vmm_ns: u64,
}

#[derive(Serialize)]
struct JsonVcpu<'a> {
    index: u32,
    exits: u64,
    guest_ns: u64,
    vmm_ns: u64,
    causes: Vec<JsonCause<'a>>,
    batched_calls: Vec<JsonCause<'a>>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    kvm: std::collections::BTreeMap<&'a str, u64>,
}

#[derive(Serialize)]
struct JsonStats<'a> {
    setup_ns: u64,
    run_ns: u64,
    exits: u64,
    guest_ns: u64,
    vmm_ns: u64,
    causes: Vec<JsonCause<'a>>,
    vcpus: Vec<JsonVcpu<'a>>,
    devices: &'a [DeviceActivity],
}

fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns}ns"),
        10_000..=9_999_999 => format!("{:.1}us", ns as f64 / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

impl VmStats {
    /// Exits by cause summed over vCPUs.
    pub fn totals(&self) -> Vec<CauseCount> {
        let mut t = vec![CauseCount::default(); self.table.len()];
        for v in &self.vcpus {
            for (i, c) in v.causes.iter().enumerate() {
                t[i].count += c.count;
                t[i].vmm_ns += c.vmm_ns;
            }
        }
        t
    }

    /// Count of `cause` (by name) over all vCPUs.
    pub fn count(&self, cause: &str) -> u64 {
        (0..self.table.len())
            .filter(|&i| self.table.name(i) == cause)
            .map(|i| self.totals()[i].count)
            .sum()
    }

    /// The JSON document of `--stats=json` (one line).
    pub fn to_json(&self) -> String {
        let nonzero = |cs: &[CauseCount]| -> Vec<JsonCause<'_>> {
            cs.iter()
                .enumerate()
                .filter(|(_, c)| c.count > 0)
                .map(|(i, c)| JsonCause {
                    cause: self.table.name(i),
                    count: c.count,
                    vmm_ns: c.vmm_ns,
                })
                .collect()
        };
        let totals = self.totals();
        let doc = JsonStats {
            setup_ns: self.setup_ns,
            run_ns: self.run_ns,
            exits: self.vcpus.iter().map(|v| v.exits).sum(),
            guest_ns: self.vcpus.iter().map(|v| v.guest_ns).sum(),
            vmm_ns: self.vcpus.iter().map(|v| v.vmm_ns).sum(),
            causes: nonzero(&totals)
                .into_iter()
                .map(|c| JsonCause {
                    cause: c.cause,
                    ..c
                })
                .collect(),
            vcpus: self
                .vcpus
                .iter()
                .map(|v| JsonVcpu {
                    index: v.index,
                    exits: v.exits,
                    guest_ns: v.guest_ns,
                    vmm_ns: v.vmm_ns,
                    causes: nonzero(&v.causes),
                    batched_calls: v
                        .batched
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| **n > 0)
                        .map(|(i, n)| JsonCause {
                            cause: Call::from_nr(i as u32).expect("dense").name(),
                            count: *n,
                            vmm_ns: 0,
                        })
                        .collect(),
                    kvm: self
                        .kvm
                        .get(v.index as usize)
                        .map(|c| {
                            c.iter()
                                .filter(|(_, n)| *n > 0)
                                .map(|(k, n)| (k.as_str(), *n))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            devices: &self.devices,
        };
        serde_json::to_string(&doc).expect("stats serialise")
    }

    /// The table of `--stats`.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "wv: exit accounting (setup {}, run {})\n",
            fmt_ns(self.setup_ns),
            fmt_ns(self.run_ns)
        ));
        s.push_str(&format!(
            "{:>4}  {:<26} {:>10} {:>10} {:>9}\n",
            "vcpu", "cause", "exits", "vmm-time", "avg"
        ));
        for v in &self.vcpus {
            for (i, c) in v.causes.iter().enumerate().filter(|(_, c)| c.count > 0) {
                s.push_str(&format!(
                    "{:>4}  {:<26} {:>10} {:>10} {:>9}\n",
                    v.index,
                    self.table.name(i),
                    c.count,
                    fmt_ns(c.vmm_ns),
                    fmt_ns(c.vmm_ns / c.count)
                ));
            }
            for (i, n) in v.batched.iter().enumerate().filter(|(_, n)| **n > 0) {
                s.push_str(&format!(
                    "{:>4}  {:<26} {:>10}\n",
                    v.index,
                    format!(
                        "  (batched) {}",
                        Call::from_nr(i as u32).expect("dense").name()
                    ),
                    n
                ));
            }
            if let Some(k) = self.kvm.get(v.index as usize) {
                let shown: Vec<String> = KVM_TABLE
                    .iter()
                    .filter_map(|name| k.iter().find(|(n, _)| n == name))
                    .map(|(n, c)| format!("{n}={c}"))
                    .collect();
                if !shown.is_empty() {
                    s.push_str(&format!(
                        "{:>4}  kvm (in-kernel included): {}\n",
                        v.index,
                        shown.join(" ")
                    ));
                }
            }
            s.push_str(&format!(
                "{:>4}  {:<26} {:>10} {:>10}   guest {}\n",
                v.index,
                "all",
                v.exits,
                fmt_ns(v.vmm_ns),
                fmt_ns(v.guest_ns)
            ));
        }
        for d in &self.devices {
            let io = match &d.io {
                None => String::new(),
                Some(DeviceIo::Disk {
                    reads,
                    read_bytes,
                    writes,
                    write_bytes,
                }) => format!(
                    " reads={reads} read_bytes={read_bytes} writes={writes} write_bytes={write_bytes}"
                ),
                Some(DeviceIo::Net {
                    rx_frames,
                    rx_bytes,
                    tx_frames,
                    tx_bytes,
                }) => format!(
                    " rx_frames={rx_frames} rx_bytes={rx_bytes} tx_frames={tx_frames} tx_bytes={tx_bytes}"
                ),
            };
            s.push_str(&format!(
                "dev   {:<26} notifications={} interrupts={} (no vCPU exits) bad_chains={} ring_errors={} resets={} refused_bar_moves={} bad_msi={}{io}\n",
                d.name, d.notifications, d.interrupts, d.bad_chains, d.ring_errors, d.resets, d.refused_bar_moves, d.bad_msi
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> VmStats {
        let table = CauseTable::new(&["serial", "i8042"], &["virtio-rng"]);
        let mut v0 = VcpuStats::new(0, table.len());
        v0.exits = 3;
        v0.record(table.io(0), 100);
        v0.record(table.io(0), 300);
        v0.record(table.call(Call::Batch), 50);
        v0.batched[Call::ConsoleWrite as usize] = 32;
        let mut v1 = VcpuStats::new(1, table.len());
        v1.exits = 1;
        v1.record(SIGNAL, 10);
        VmStats {
            table,
            vcpus: vec![v0, v1],
            setup_ns: 1,
            run_ns: 2,
            kvm: vec![vec![("exits".into(), 9), ("halt_exits".into(), 0)], vec![]],
            devices: vec![
                DeviceActivity {
                    name: "virtio-rng".into(),
                    notifications: 2,
                    interrupts: 1,
                    ..DeviceActivity::default()
                },
                DeviceActivity {
                    name: "virtio-blk:d0".into(),
                    io: Some(DeviceIo::Disk {
                        reads: 3,
                        read_bytes: 1536,
                        writes: 1,
                        write_bytes: 512,
                    }),
                    ..DeviceActivity::default()
                },
            ],
        }
    }

    #[test]
    fn live_exits_sum_the_vcpus_by_cause_name_and_ignore_what_is_out_of_range() {
        let t = CauseTable::new(&["serial"], &["virtio-blk:data"]);
        let live = LiveExits::new(2, t.len());
        live.bump(0, t.io(0));
        live.bump(1, t.io(0));
        live.bump(1, t.mmio(0));
        live.bump(2, t.io(0)); // no such vCPU
        live.bump(0, t.len()); // no such cause
        assert_eq!(
            live.totals(&t),
            [
                ("io:serial".to_string(), 2),
                ("mmio:virtio-blk:data".to_string(), 1)
            ]
        );
    }

    #[test]
    fn causes_are_named_and_indexed() {
        let t = CauseTable::new(&["serial"], &["virtio-rng"]);
        assert_eq!(t.name(t.io(0)), "io:serial");
        assert_eq!(t.name(t.call(Call::Poweroff)), "hypercall:poweroff");
        assert_eq!(t.name(HYPERCALL_INVALID), "hypercall:invalid");
        assert_eq!(t.name(t.mmio(0)), "mmio:virtio-rng");
        assert_eq!(t.len(), FIXED.len() + 2 + CALL_COUNT as usize);
    }

    #[test]
    fn totals_and_counts() {
        let s = stats();
        assert_eq!(s.count("io:serial"), 2);
        assert_eq!(s.count("signal"), 1);
        assert_eq!(s.count("io:i8042"), 0);
        assert_eq!(s.vcpus[0].vmm_ns, 450);
    }

    #[test]
    fn json_has_every_nonzero_cause() {
        let j: serde_json::Value = serde_json::from_str(&stats().to_json()).unwrap();
        assert_eq!(j["exits"], 4);
        let causes = j["causes"].as_array().unwrap();
        assert_eq!(causes.len(), 3);
        assert!(causes
            .iter()
            .any(|c| c["cause"] == "io:serial" && c["count"] == 2 && c["vmm_ns"] == 400));
        assert_eq!(j["vcpus"][0]["batched_calls"][0]["cause"], "console_write");
        assert_eq!(j["vcpus"][0]["batched_calls"][0]["count"], 32);
        assert_eq!(j["vcpus"][0]["kvm"]["exits"], 9);
        assert_eq!(j["devices"][0]["notifications"], 2);
        assert!(j["devices"][0].get("io").is_none(), "no data path counted");
        assert_eq!(
            j["devices"][1]["io"],
            serde_json::json!({"kind": "disk", "reads": 3, "read_bytes": 1536, "writes": 1, "write_bytes": 512})
        );
        assert!(
            j["vcpus"][0]["kvm"].get("halt_exits").is_none(),
            "zero counters are left out"
        );
    }

    #[test]
    fn table_lists_rows() {
        let t = stats().to_table();
        assert!(t.contains("io:serial"));
        assert!(t.contains("(batched) console_write"));
        assert!(!t.contains("io:i8042"));
        assert!(t.contains("kvm (in-kernel included): exits=9 halt_exits=0"));
        assert!(t.contains("notifications=2 interrupts=1"));
        assert!(t.contains("reads=3 read_bytes=1536 writes=1 write_bytes=512"));
    }
}
