//! The interrupt controllers of a VM run without KVM's in-kernel irqchip (`wv run --irqchip
//! user`): the register logic of a local APIC (xAPIC, MMIO at [`LAPIC_BASE`]) and of an I/O
//! APIC ([`IOAPIC_BASE`], 24 pins), the plain-data message [`Irq`] every interrupt source sends
//! to a [`Destination`], MSI decoding, and the [`Deliver`] trait through which a message reaches
//! the local APIC of one APIC ID wherever it lives (this process, or later another node's).
//!
//! Nothing here knows KVM, threads or clocks: time comes in as nanoseconds from the caller
//! (the APIC bus runs at 1 GHz, as KVM's does), and every effect a register write has outside
//! its own controller (an IPI, an EOI a level-triggered pin waits for, a new timer deadline) is
//! returned for the caller to carry out. The VMM's `uapic` module drives these with vCPUs.

use serde::{Deserialize, Serialize};

/// Guest-physical address of the local APIC's page (every vCPU sees its own there).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Guest-physical address of the I/O APIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of either controller's MMIO page.
pub const APIC_PAGE: u64 = 0x1000;
/// The I/O APIC's input pins.
pub const IOAPIC_PINS: usize = 24;
/// The local APIC version register: version 0x14 (integrated xAPIC), six LVT entries.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// How an interrupt is delivered (the ICR's, a redirection entry's and an MSI's 3-bit field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// The vector, to every destination.
    Fixed,
    /// The vector, to one of the destinations (here: the lowest-numbered APIC ID matched).
    LowestPriority,
    /// System management interrupt (dropped: there is no SMM).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT (with level assert; a de-assert is ignored).
    Init,
    /// STARTUP: an AP waiting after INIT starts in real mode at `vector << 12`.
    StartUp,
    /// External interrupt from an 8259 (dropped: there is no PIC).
    ExtInt,
}

impl DeliveryMode {
    /// The mode coded as `bits` (the low three bits); None for the reserved value 3.
    pub fn from_bits(bits: u32) -> Option<DeliveryMode> {
        Some(match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }
}

/// Edge- or level-triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Edge: delivered once.
    Edge,
    /// Level: the local APIC sets the vector's TMR bit, and its EOI is broadcast to the I/O
    /// APIC, which then clears the pin's remote IRR.
    Level,
}

/// One interrupt message from any source (an IPI, an I/O APIC pin, an MSI): plain data, so
/// that a cluster layer can send it to another process as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Irq {
    /// The vector (Fixed, LowestPriority; STARTUP's page number).
    pub vector: u8,
    /// The delivery mode.
    pub mode: DeliveryMode,
    /// The trigger mode.
    pub trigger: Trigger,
    /// The ICR's level bit: false only for an INIT de-assert, which does nothing.
    pub assert: bool,
}

impl Irq {
    /// A fixed, edge-triggered interrupt on `vector`.
    pub fn fixed(vector: u8) -> Irq {
        Irq {
            vector,
            mode: DeliveryMode::Fixed,
            trigger: Trigger::Edge,
            assert: true,
        }
    }
}

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// One APIC ID (0xff: every local APIC).
    Physical(u32),
    /// The local APICs whose logical destination (LDR, in the DFR's flat or cluster model)
    /// matches this 8-bit mask.
    Logical(u8),
    /// The sender itself (ICR shorthand 01).
    SelfOnly(u32),
    /// Every local APIC, the sender included (shorthand 10).
    All,
    /// Every local APIC but the sender (shorthand 11).
    AllBut(u32),
}

/// What takes a message to the local APIC of one APIC ID. The VMM's local implementation
/// queues it on the vCPU of that ID in this process and wakes it; a cluster layer puts its
/// own in front, which sends a message for an APIC ID that lives on another node there.
pub trait Deliver: Send + Sync {
    /// Delivers `irq` to the local APIC with ID `apic_id` (unknown IDs are dropped).
    fn deliver(&self, apic_id: u32, irq: Irq);

    /// A local APIC of this process changed its addressing (LDR, DFR): a cluster layer tells
    /// the other nodes, which resolve logical destinations too. Nothing by default.
    fn addressing_changed(&self, _a: Addressing) {}

    /// A level-triggered vector's EOI: true if the I/O APIC lives elsewhere and the EOI was
    /// sent there (a cluster node other than 0), false to handle it here (the default).
    fn level_eoi_elsewhere(&self, _vector: u8) -> bool {
        false
    }
}

/// A local APIC's addressing, for resolving a [`Destination`]: its ID, LDR and DFR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressing {
    /// APIC ID.
    pub id: u32,
    /// Logical destination register (the logical ID in bits 24-31).
    pub ldr: u32,
    /// Destination format register (bits 28-31: 0xf flat, 0x0 cluster).
    pub dfr: u32,
}

impl Addressing {
    fn matches_logical(&self, mask: u8) -> bool {
        let logical = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            logical & mask != 0
        } else {
            // Cluster model: the high nibble names the cluster, the low one the members.
            (logical >> 4) == (mask >> 4) && (logical & mask & 0xf) != 0
        }
    }
}

/// The APIC IDs `dest` names among `apics`, in their order; `irq`'s mode decides whether one
/// (lowest priority: the first match) or all of them get it.
pub fn targets(dest: Destination, irq: &Irq, apics: &[Addressing]) -> Vec<u32> {
    let all: Vec<u32> = match dest {
        Destination::Physical(0xff) | Destination::All => apics.iter().map(|a| a.id).collect(),
        Destination::Physical(id) | Destination::SelfOnly(id) => {
            apics.iter().filter(|a| a.id == id).map(|a| a.id).collect()
        }
        Destination::AllBut(me) => apics.iter().filter(|a| a.id != me).map(|a| a.id).collect(),
        Destination::Logical(mask) => apics
            .iter()
            .filter(|a| a.matches_logical(mask))
            .map(|a| a.id)
            .collect(),
    };
    if irq.mode == DeliveryMode::LowestPriority {
        all.into_iter().take(1).collect()
    } else {
        all
    }
}

/// Decodes an MSI (address, data) as a PCI device writes it; None if the address is not in the
/// local APICs' window or the delivery mode is reserved.
pub fn msi(addr: u64, data: u32) -> Option<(Destination, Irq)> {
    if addr >> 20 != LAPIC_BASE >> 20 {
        return None;
    }
    let id = ((addr >> 12) & 0xff) as u32;
    let dest = if addr & (1 << 2) != 0 {
        Destination::Logical(id as u8)
    } else {
        Destination::Physical(id)
    };
    let irq = Irq {
        vector: (data & 0xff) as u8,
        mode: DeliveryMode::from_bits(data >> 8)?,
        trigger: if data & (1 << 15) != 0 {
            Trigger::Level
        } else {
            Trigger::Edge
        },
        assert: true,
    };
    Some((dest, irq))
}

/// Local APIC register offsets (xAPIC MMIO).
pub mod reg {
    /// APIC ID.
    pub const ID: u64 = 0x20;
    /// Version.
    pub const VERSION: u64 = 0x30;
    /// Task priority.
    pub const TPR: u64 = 0x80;
    /// Arbitration priority (reads 0).
    pub const APR: u64 = 0x90;
    /// Processor priority.
    pub const PPR: u64 = 0xa0;
    /// End of interrupt.
    pub const EOI: u64 = 0xb0;
    /// Logical destination.
    pub const LDR: u64 = 0xd0;
    /// Destination format.
    pub const DFR: u64 = 0xe0;
    /// Spurious interrupt vector (bit 8: software enable).
    pub const SVR: u64 = 0xf0;
    /// In-service register, eight words 0x10 apart.
    pub const ISR: u64 = 0x100;
    /// Trigger mode register.
    pub const TMR: u64 = 0x180;
    /// Interrupt request register.
    pub const IRR: u64 = 0x200;
    /// Error status.
    pub const ESR: u64 = 0x280;
    /// Interrupt command, low half (writing it sends).
    pub const ICR_LOW: u64 = 0x300;
    /// Interrupt command, high half (destination in bits 24-31).
    pub const ICR_HIGH: u64 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u64 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u64 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u64 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u64 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u64 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u64 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u64 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: u64 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u64 = 0x3e0;
}

const LVT_MASKED: u32 = 1 << 16;
/// The shortest period of a periodic timer (KVM's `min_timer_period_us`, 200 us): a guest
/// cannot make its vCPU's thread take a host timer signal every few nanoseconds.
pub const MIN_PERIODIC_NS: u64 = 200_000;
/// Writable bits of each LVT entry, by index from [`reg::LVT_TIMER`].
const LVT_WRITABLE: [u32; 6] = [0x700ff, 0x107ff, 0x107ff, 0x1a7ff, 0x1a7ff, 0x100ff];
/// ESR bit: a message with an illegal vector (0-15) was received.
const ESR_RECEIVE_ILLEGAL: u32 = 1 << 6;
/// ESR bit: a message with an illegal vector was to be sent.
const ESR_SEND_ILLEGAL: u32 = 1 << 5;

/// What a local APIC register write asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicEffect {
    /// Nothing beyond the register.
    None,
    /// Send `Irq` to `Destination` (an ICR write).
    Ipi(Destination, Irq),
    /// A level-triggered vector's EOI: the I/O APIC clears the remote IRR of its pins.
    LevelEoi(u8),
    /// The timer was programmed: its deadline ([`LocalApic::timer_deadline`]) changed.
    Timer,
    /// The logical addressing (LDR or DFR) changed.
    Addressing,
}

/// A 256-bit vector register (ISR, TMR, IRR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bits([u32; 8]);

impl Bits {
    fn set(&mut self, v: u8, on: bool) {
        let (w, b) = (usize::from(v >> 5), v & 31);
        if on {
            self.0[w] |= 1 << b;
        } else {
            self.0[w] &= !(1 << b);
        }
    }
    fn get(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn highest(&self) -> Option<u8> {
        (0..8usize).rev().find_map(|w| {
            let x = self.0[w];
            if x == 0 {
                None
            } else {
                u8::try_from(w * 32 + 31 - x.leading_zeros() as usize).ok()
            }
        })
    }
}

/// One local APIC's registers and timer (see the module documentation).
#[derive(Clone, Debug)]
pub struct LocalApic {
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits,
    tmr: Bits,
    irr: Bits,
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    /// When the current count was last loaded from the initial count (ns).
    timer_start: u64,
    /// When the timer next fires (ns), if it is running.
    timer_deadline: Option<u64>,
}

impl LocalApic {
    /// A local APIC with ID `id` in its state after reset (software-disabled, LVTs masked).
    pub fn new(id: u32) -> LocalApic {
        LocalApic {
            id,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: Bits::default(),
            tmr: Bits::default(),
            irr: Bits::default(),
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer_start: 0,
            timer_deadline: None,
        }
    }

    /// INIT: every register back to its reset value but the APIC ID.
    pub fn init(&mut self) {
        *self = LocalApic::new(self.id);
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The logical addressing of this APIC.
    pub fn addressing(&self) -> Addressing {
        Addressing {
            id: self.id,
            ldr: self.ldr,
            dfr: self.dfr,
        }
    }

    /// Software-enabled (SVR bit 8).
    pub fn enabled(&self) -> bool {
        self.svr & 0x100 != 0
    }

    /// Processor priority: the TPR or the highest in-service vector's class, whichever is
    /// higher.
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// Accepts a fixed or lowest-priority message: its vector into the IRR (and the TMR when
    /// level-triggered). Returns false if it was refused (an illegal vector, 0-15).
    pub fn accept(&mut self, irq: &Irq) -> bool {
        if irq.vector < 16 {
            self.esr_pending |= ESR_RECEIVE_ILLEGAL;
            return false;
        }
        self.irr.set(irq.vector, true);
        self.tmr.set(irq.vector, irq.trigger == Trigger::Level);
        true
    }

    /// The vector the processor should take now, if any: the highest requested one whose
    /// priority class is above the processor priority, with the APIC software-enabled.
    pub fn pending(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The processor takes `vector` (from [`LocalApic::pending`]): IRR to ISR.
    pub fn ack(&mut self, vector: u8) {
        self.irr.set(vector, false);
        self.isr.set(vector, true);
    }

    /// Undoes [`LocalApic::ack`] (the injection failed): the vector is requested again.
    pub fn unack(&mut self, vector: u8) {
        self.isr.set(vector, false);
        self.irr.set(vector, true);
    }

    /// End of interrupt: the highest in-service vector leaves the ISR; returns it when it was
    /// level-triggered (the I/O APIC must hear of it).
    pub fn eoi(&mut self) -> Option<u8> {
        let v = self.isr.highest()?;
        self.isr.set(v, false);
        self.tmr.get(v).then_some(v)
    }

    /// The timer's divisor (divide configuration register: bits 0, 1 and 3).
    pub fn timer_divisor(&self) -> u64 {
        let code = (self.timer_divide & 3) | ((self.timer_divide & 8) >> 1);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    fn timer_periodic(&self) -> bool {
        (self.lvt[0] >> 17) & 3 == 1
    }

    /// One period of the timer in nanoseconds (one bus cycle is 1 ns).
    fn timer_period(&self) -> u64 {
        let p = u64::from(self.timer_initial) * self.timer_divisor();
        if self.timer_periodic() {
            p.max(MIN_PERIODIC_NS)
        } else {
            p
        }
    }

    /// When the timer fires next (ns), if it runs.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.timer_deadline
    }

    /// Fires the timer if its deadline is at or before `now`: its vector is requested unless
    /// the LVT entry is masked, and a periodic timer's next deadline is the first period end
    /// after `now` (periods missed while the vCPU could not run are not made up one by one).
    /// Returns whether it fired.
    pub fn timer_fire(&mut self, now: u64) -> bool {
        let Some(d) = self.timer_deadline else {
            return false;
        };
        if d > now {
            return false;
        }
        let period = self.timer_period();
        if self.timer_periodic() && period > 0 {
            let missed = (now - d) / period;
            self.timer_deadline = Some(d + (missed + 1) * period);
        } else {
            self.timer_deadline = None;
        }
        if self.lvt[0] & LVT_MASKED == 0 {
            let v = (self.lvt[0] & 0xff) as u8;
            self.accept(&Irq::fixed(v));
        }
        true
    }

    fn timer_current(&self, now: u64) -> u32 {
        if self.timer_initial == 0 || self.timer_deadline.is_none() {
            return 0;
        }
        let ticks = now.saturating_sub(self.timer_start) / self.timer_divisor();
        let initial = u64::from(self.timer_initial);
        let left = if self.timer_periodic() {
            initial - ticks % initial
        } else {
            initial.saturating_sub(ticks)
        };
        u32::try_from(left).unwrap_or(u32::MAX)
    }

    /// Reads the register at `offset` (a 32-bit aligned offset into the page) at time `now`.
    pub fn read(&self, offset: u64, now: u64) -> u32 {
        let word = |b: &Bits, base: u64| b.0[((offset - base) >> 4) as usize];
        match offset {
            reg::ID => self.id << 24,
            reg::VERSION => LAPIC_VERSION,
            reg::TPR => self.tpr,
            reg::PPR => self.ppr(),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            0x100..=0x170 if offset & 0xf == 0 => word(&self.isr, reg::ISR),
            0x180..=0x1f0 if offset & 0xf == 0 => word(&self.tmr, reg::TMR),
            0x200..=0x270 if offset & 0xf == 0 => word(&self.irr, reg::IRR),
            reg::ESR => self.esr,
            reg::ICR_LOW => self.icr_low,
            reg::ICR_HIGH => self.icr_high,
            0x320..=0x370 if offset & 0xf == 0 => {
                self.lvt[((offset - reg::LVT_TIMER) >> 4) as usize]
            }
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.timer_current(now),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => 0,
        }
    }

    /// Writes `value` to the register at `offset` at time `now`; read-only and reserved
    /// registers ignore it.
    pub fn write(&mut self, offset: u64, value: u32, now: u64) -> ApicEffect {
        match offset {
            reg::TPR => self.tpr = value & 0xff,
            reg::EOI => {
                if let Some(v) = self.eoi() {
                    return ApicEffect::LevelEoi(v);
                }
            }
            reg::LDR => {
                self.ldr = value & 0xff00_0000;
                return ApicEffect::Addressing;
            }
            reg::DFR => {
                self.dfr = value | 0x0fff_ffff;
                return ApicEffect::Addressing;
            }
            reg::SVR => {
                self.svr = value & 0x13ff;
                if !self.enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                // A write latches the errors seen since the last one.
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            reg::ICR_HIGH => self.icr_high = value & 0xff00_0000,
            reg::ICR_LOW => {
                self.icr_low = value & 0x000c_dfff;
                return self.send();
            }
            0x320..=0x370 if offset & 0xf == 0 => {
                let i = ((offset - reg::LVT_TIMER) >> 4) as usize;
                let mut v = value & LVT_WRITABLE[i];
                if !self.enabled() {
                    v |= LVT_MASKED;
                }
                let was_periodic = self.timer_periodic();
                self.lvt[i] = v;
                if i == 0 && was_periodic != self.timer_periodic() {
                    // A mode change stops the timer (as KVM does).
                    self.timer_deadline = None;
                    return ApicEffect::Timer;
                }
            }
            reg::TIMER_INITIAL => {
                self.timer_initial = value;
                self.timer_start = now;
                self.timer_deadline = (value != 0).then(|| now + self.timer_period());
                return ApicEffect::Timer;
            }
            reg::TIMER_DIVIDE => self.timer_divide = value & 0xb,
            _ => {}
        }
        ApicEffect::None
    }

    /// The message an ICR low write sends.
    fn send(&mut self) -> ApicEffect {
        let low = self.icr_low;
        let Some(mode) = DeliveryMode::from_bits(low >> 8) else {
            return ApicEffect::None;
        };
        let irq = Irq {
            vector: (low & 0xff) as u8,
            mode,
            trigger: if low & (1 << 15) != 0 {
                Trigger::Level
            } else {
                Trigger::Edge
            },
            assert: low & (1 << 14) != 0 || mode != DeliveryMode::Init,
        };
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && irq.vector < 16 {
            self.esr_pending |= ESR_SEND_ILLEGAL;
            return ApicEffect::None;
        }
        let target = self.icr_high >> 24;
        let dest = match (low >> 18) & 3 {
            0 if low & (1 << 11) != 0 => Destination::Logical(target as u8),
            0 => Destination::Physical(target),
            1 => Destination::SelfOnly(self.id),
            2 => Destination::All,
            _ => Destination::AllBut(self.id),
        };
        ApicEffect::Ipi(dest, irq)
    }
}

/// The I/O APIC's registers (reached through IOREGSEL at 0x00 and IOWIN at 0x10) and its pins.
#[derive(Clone, Debug)]
pub struct IoApic {
    id: u32,
    select: u32,
    redir: [u64; IOAPIC_PINS],
    /// Each pin's line: asserted or not.
    line: [bool; IOAPIC_PINS],
}

impl Default for IoApic {
    fn default() -> IoApic {
        IoApic::new()
    }
}

const REDIR_MASKED: u64 = 1 << 16;
const REDIR_REMOTE_IRR: u64 = 1 << 14;
const REDIR_LEVEL: u64 = 1 << 15;
/// Bits of a redirection entry the guest can write (not delivery status nor remote IRR).
const REDIR_WRITABLE: u64 = 0xff00_0000_0001_afff;

impl IoApic {
    /// An I/O APIC after reset: ID 0, every pin masked.
    pub fn new() -> IoApic {
        IoApic {
            id: 0,
            select: 0,
            redir: [REDIR_MASKED; IOAPIC_PINS],
            line: [false; IOAPIC_PINS],
        }
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redir.get(pin).copied()
    }

    /// The message pin `pin`'s entry sends.
    fn message(&self, pin: usize) -> Option<(Destination, Irq)> {
        let e = self.redir[pin];
        let mode = DeliveryMode::from_bits(((e >> 8) & 7) as u32)?;
        let target = (e >> 56) as u32;
        let dest = if e & (1 << 11) != 0 {
            Destination::Logical(target as u8)
        } else {
            Destination::Physical(target)
        };
        let irq = Irq {
            vector: (e & 0xff) as u8,
            mode,
            trigger: if e & REDIR_LEVEL != 0 {
                Trigger::Level
            } else {
                Trigger::Edge
            },
            assert: true,
        };
        Some((dest, irq))
    }

    /// Delivers pin `pin` if its line is asserted, it is unmasked and (level-triggered) no
    /// earlier delivery waits for its EOI.
    fn service(&mut self, pin: usize) -> Option<(Destination, Irq)> {
        let e = self.redir[pin];
        if !self.line[pin] || e & REDIR_MASKED != 0 {
            return None;
        }
        if e & REDIR_LEVEL != 0 {
            if e & REDIR_REMOTE_IRR != 0 {
                return None;
            }
            self.redir[pin] |= REDIR_REMOTE_IRR;
        }
        self.message(pin)
    }

    /// Sets pin `pin`'s line (true: asserted, whatever the entry's polarity says). An edge
    /// pin delivers on a rising edge, a level pin while asserted; returns what to deliver.
    pub fn set_pin(&mut self, pin: usize, asserted: bool) -> Option<(Destination, Irq)> {
        let was = *self.line.get(pin)?;
        self.line[pin] = asserted;
        let level = self.redir[pin] & REDIR_LEVEL != 0;
        if asserted && (level || !was) {
            self.service(pin)
        } else {
            None
        }
    }

    /// A local APIC's EOI of a level-triggered `vector`: the remote IRR of every level pin on
    /// it clears, and a pin still asserted delivers again. Returns what to deliver.
    pub fn eoi(&mut self, vector: u8) -> Vec<(Destination, Irq)> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let e = self.redir[pin];
            if (e & 0xff) as u8 == vector && e & REDIR_REMOTE_IRR != 0 {
                self.redir[pin] &= !REDIR_REMOTE_IRR;
                out.extend(self.service(pin));
            }
        }
        out
    }

    /// Reads the 32-bit register at `offset` (IOREGSEL or IOWIN).
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => self.select,
            0x10 => match self.select {
                0 => self.id << 24,
                // Version 0x11, 24 entries (the highest index, 23, in bits 16-23).
                1 => 0x0017_0011,
                2 => self.id << 24,
                r @ 0x10..=0x3f => {
                    let e = self.redir[((r - 0x10) / 2) as usize];
                    if r & 1 == 0 {
                        (e & 0xffff_ffff) as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `offset`; returns what to deliver (a pin unmasked while
    /// its line is asserted).
    pub fn write(&mut self, offset: u64, value: u32) -> Option<(Destination, Irq)> {
        match offset {
            0x00 => self.select = value & 0xff,
            0x10 => match self.select {
                0 => self.id = (value >> 24) & 0xf,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let e = self.redir[pin];
                    let new = if r & 1 == 0 {
                        (e & !0xffff_ffff) | u64::from(value)
                    } else {
                        (e & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                    let keep = e & !REDIR_WRITABLE;
                    self.redir[pin] = (new & REDIR_WRITABLE) | keep;
                    if self.redir[pin] & REDIR_LEVEL == 0 {
                        self.redir[pin] &= !REDIR_REMOTE_IRR;
                    }
                    // Unmasking a level pin that is asserted delivers it now.
                    if self.redir[pin] & REDIR_LEVEL != 0 {
                        return self.service(pin);
                    }
                }
                _ => {}
            },
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id);
        a.write(reg::SVR, 0x1ff, 0);
        a
    }

    #[test]
    fn priority_irr_isr_and_eoi() {
        let mut a = enabled(0);
        assert!(a.accept(&Irq::fixed(0x31)));
        assert!(a.accept(&Irq::fixed(0x52)));
        // The highest class goes first.
        assert_eq!(a.pending(), Some(0x52));
        a.ack(0x52);
        assert_eq!(a.ppr(), 0x50);
        // 0x31 is below the in-service class: it waits.
        assert_eq!(a.pending(), None);
        assert_eq!(a.read(reg::ISR + 0x20, 0), 1 << (0x52 - 0x40));
        assert_eq!(a.read(reg::IRR + 0x10, 0), 1 << (0x31 - 0x20));
        // A higher class preempts.
        a.accept(&Irq::fixed(0x61));
        assert_eq!(a.pending(), Some(0x61));
        a.ack(0x61);
        assert_eq!(a.write(reg::EOI, 0, 0), ApicEffect::None);
        assert_eq!(a.ppr(), 0x50, "the EOI ended 0x61, the highest in service");
        a.write(reg::EOI, 0, 0);
        assert_eq!(a.pending(), Some(0x31));
        // The TPR holds it back.
        a.write(reg::TPR, 0x30, 0);
        assert_eq!(a.pending(), None);
        a.write(reg::TPR, 0x20, 0);
        assert_eq!(a.pending(), Some(0x31));
    }

    #[test]
    fn a_disabled_apic_holds_interrupts_and_illegal_vectors_are_refused() {
        let mut a = LocalApic::new(1);
        a.accept(&Irq::fixed(0x40));
        assert_eq!(a.pending(), None, "software-disabled");
        a.write(reg::SVR, 0x1ff, 0);
        assert_eq!(a.pending(), Some(0x40));
        assert!(!a.accept(&Irq::fixed(7)));
        a.write(reg::ESR, 0, 0);
        assert_eq!(a.read(reg::ESR, 0), ESR_RECEIVE_ILLEGAL);
    }

    #[test]
    fn level_eoi_is_reported() {
        let mut a = enabled(0);
        a.accept(&Irq {
            trigger: Trigger::Level,
            ..Irq::fixed(0x70)
        });
        a.ack(a.pending().unwrap());
        assert_eq!(a.write(reg::EOI, 0, 0), ApicEffect::LevelEoi(0x70));
    }

    #[test]
    fn icr_shorthands_and_modes() {
        use ApicEffect::Ipi;
        let mut a = enabled(2);
        a.write(reg::ICR_HIGH, 3 << 24, 0);
        let Ipi(d, irq) = a.write(reg::ICR_LOW, 0x4500, 0) else {
            panic!("INIT was not sent")
        };
        assert_eq!(d, Destination::Physical(3));
        assert_eq!((irq.mode, irq.assert), (DeliveryMode::Init, true));
        let Ipi(_, irq) = a.write(reg::ICR_LOW, 0x4608, 0) else {
            panic!("SIPI was not sent")
        };
        assert_eq!((irq.mode, irq.vector), (DeliveryMode::StartUp, 8));
        let cases = [
            (0x0004_0040, Destination::SelfOnly(2)),
            (0x0008_0040, Destination::All),
            (0x000c_0040, Destination::AllBut(2)),
            (0x0000_0840, Destination::Logical(3)),
        ];
        for (low, want) in cases {
            assert_eq!(
                a.write(reg::ICR_LOW, low, 0),
                Ipi(want, Irq::fixed(0x40)),
                "{low:#x}"
            );
        }
        // INIT de-assert (level 0, level-triggered) does nothing at the target.
        let Ipi(_, irq) = a.write(reg::ICR_LOW, 0x8500, 0) else {
            panic!()
        };
        assert!(!irq.assert);
        // A fixed IPI with an illegal vector is not sent.
        assert_eq!(a.write(reg::ICR_LOW, 0x4005, 0), ApicEffect::None);
    }

    #[test]
    fn destinations_resolve_physical_logical_and_broadcast() {
        let apics = [
            Addressing {
                id: 0,
                ldr: 1 << 24,
                dfr: 0xffff_ffff,
            },
            Addressing {
                id: 1,
                ldr: 2 << 24,
                dfr: 0xffff_ffff,
            },
            Addressing {
                id: 2,
                ldr: 4 << 24,
                dfr: 0xffff_ffff,
            },
        ];
        let f = Irq::fixed(0x40);
        assert_eq!(targets(Destination::Physical(1), &f, &apics), vec![1]);
        assert_eq!(
            targets(Destination::Physical(0xff), &f, &apics),
            vec![0, 1, 2]
        );
        assert_eq!(
            targets(Destination::Physical(9), &f, &apics),
            Vec::<u32>::new()
        );
        assert_eq!(targets(Destination::Logical(6), &f, &apics), vec![1, 2]);
        assert_eq!(targets(Destination::AllBut(1), &f, &apics), vec![0, 2]);
        let lowest = Irq {
            mode: DeliveryMode::LowestPriority,
            ..f
        };
        assert_eq!(targets(Destination::Logical(6), &lowest, &apics), vec![1]);
        let cluster = [Addressing {
            id: 5,
            ldr: 0x21 << 24,
            dfr: 0x0fff_ffff,
        }];
        assert_eq!(targets(Destination::Logical(0x21), &f, &cluster), vec![5]);
        assert!(targets(Destination::Logical(0x11), &f, &cluster).is_empty());
    }

    #[test]
    fn timer_divide_one_shot_and_periodic() {
        let mut a = enabled(0);
        for (code, div) in [
            (0, 2),
            (1, 4),
            (2, 8),
            (3, 16),
            (8, 32),
            (9, 64),
            (0xa, 128),
            (0xb, 1),
        ] {
            a.write(reg::TIMER_DIVIDE, code, 0);
            assert_eq!(a.timer_divisor(), div, "divide code {code:#x}");
        }
        a.write(reg::TIMER_DIVIDE, 1, 0); // by 4
        a.write(reg::LVT_TIMER, 0x40, 0); // one-shot, vector 0x40
        assert_eq!(a.write(reg::TIMER_INITIAL, 1000, 100), ApicEffect::Timer);
        assert_eq!(a.timer_deadline(), Some(100 + 4000));
        assert_eq!(a.read(reg::TIMER_CURRENT, 100 + 400), 900);
        assert!(!a.timer_fire(4099));
        assert!(a.timer_fire(4100));
        assert_eq!(a.timer_deadline(), None);
        assert_eq!(a.read(reg::TIMER_CURRENT, 5000), 0);
        assert_eq!(a.pending(), Some(0x40));
        // Periodic: the next deadline is the next period end after now.
        a.write(reg::LVT_TIMER, 0x20041, 0);
        a.write(reg::TIMER_INITIAL, 100_000, 0);
        assert_eq!(a.timer_deadline(), Some(400_000));
        assert!(a.timer_fire(450_000));
        assert_eq!(a.timer_deadline(), Some(800_000));
        assert!(a.timer_fire(2_500_000));
        assert_eq!(
            a.timer_deadline(),
            Some(2_800_000),
            "missed periods are not queued"
        );
        // 625000 ticks of 4 ns: 25000 into a period of 100000.
        assert_eq!(a.read(reg::TIMER_CURRENT, 2_500_000), 75_000);
        // A periodic timer runs no faster than MIN_PERIODIC_NS; a one-shot may.
        a.write(reg::TIMER_INITIAL, 10, 3_000_000);
        assert_eq!(a.timer_deadline(), Some(3_000_000 + MIN_PERIODIC_NS));
        a.write(reg::LVT_TIMER, 0x41, 0);
        a.write(reg::TIMER_INITIAL, 10, 4_000_000);
        assert_eq!(a.timer_deadline(), Some(4_000_040));
        // A masked timer runs on but requests nothing.
        let mut b = enabled(0);
        b.write(reg::LVT_TIMER, 0x10040, 0);
        b.write(reg::TIMER_INITIAL, 1, 0);
        assert!(b.timer_fire(10));
        assert_eq!(b.pending(), None);
    }

    #[test]
    fn ioapic_edge_level_mask_and_remote_irr() {
        let mut io = IoApic::new();
        let entry = |io: &mut IoApic, pin: u32, low: u32, high: u32| {
            io.write(0, 0x10 + 2 * pin);
            io.write(0x10, low);
            io.write(0, 0x11 + 2 * pin);
            io.write(0x10, high);
        };
        io.write(0, 1);
        assert_eq!(io.read(0x10), 0x0017_0011);
        // Masked after reset.
        assert_eq!(io.set_pin(4, true), None);
        io.set_pin(4, false);
        entry(&mut io, 4, 0x24, 1 << 24);
        let (d, irq) = io.set_pin(4, true).unwrap();
        assert_eq!((d, irq), (Destination::Physical(1), Irq::fixed(0x24)));
        assert_eq!(
            io.set_pin(4, true),
            None,
            "an edge pin delivers on the rising edge"
        );
        io.set_pin(4, false);
        assert!(io.set_pin(4, true).is_some());
        // Level: remote IRR until EOI, then again while asserted.
        entry(&mut io, 9, 0x8039, 0);
        assert!(io.set_pin(9, true).is_some());
        assert_eq!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, REDIR_REMOTE_IRR);
        assert_eq!(io.set_pin(9, true), None);
        assert_eq!(io.eoi(0x39).len(), 1, "still asserted: delivered again");
        io.set_pin(9, false);
        assert!(io.eoi(0x39).is_empty());
        assert_eq!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, 0);
        // The guest cannot write remote IRR.
        entry(&mut io, 9, 0x1_c039, 0);
        assert_eq!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, 0);
        assert_eq!(io.set_pin(40, true), None, "no such pin");
    }

    #[test]
    fn msi_decoding() {
        let (d, irq) = msi(0xfee0_3000, 0x4051).unwrap();
        assert_eq!((d, irq), (Destination::Physical(3), Irq::fixed(0x51)));
        let (d, irq) = msi(0xfee0_100c, 0xc162).unwrap();
        assert_eq!(d, Destination::Logical(1));
        assert_eq!(
            (irq.mode, irq.trigger),
            (DeliveryMode::LowestPriority, Trigger::Level)
        );
        assert!(msi(0xfec0_0000, 0x40).is_none());
        assert!(msi(0xfee0_0000, 0x340).is_none(), "reserved mode");
        let text = serde_json::to_string(&Irq::fixed(0x40)).unwrap();
        assert_eq!(
            serde_json::from_str::<Irq>(&text).unwrap(),
            Irq::fixed(0x40)
        );
    }
}
