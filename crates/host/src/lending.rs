//! Memory lent between running VMs: the daemon's automatic balloon policy (`wv host
//! --host-memory-reserve`). Owns the policy's settings, its decision (whom to take memory
//! from and whom to give it back to, as ESX does: shares per page with an idle-memory tax),
//! the per-world report (shares, active fraction, target, current, lent, borrowed) and the
//! reading of the host's free memory. The daemon ([`crate::api`]) samples its VMs' balloons
//! once a second, calls [`decide`] and sets the targets it returns.
//!
//! - **Priority.** A VM's shares per page with the idle tax, rho = S / (P (f + k (1 - f))),
//!   S its CPU shares, P its current pages, f its active fraction, k = 1 / (1 - tax). Memory
//!   is reclaimed from the lowest rho first: an idle page costs k times an active one.
//! - **Active fraction.** From the guest's balloon statistics: f = 1 - available / total
//!   (`available_memory`, else `free_memory`, over `total_memory`, the guest's memory outside
//!   its balloon). A guest that sends no statistics counts as wholly active (f = 1): it is
//!   never reclaimed from. The guest's own free count is a proxy: ESX samples page-table
//!   access bits instead and sees memory a guest holds but no longer touches (caches) as
//!   idle, which this estimate calls active.
//! - **Floor.** A VM never goes below its active memory plus a margin ([`margin`]), nor below
//!   [`MIN_FLOOR`] or a quarter of its memory.
//! - **Reclaim.** While the host's free memory (plus what balloons are still inflating to)
//!   is below the reserve, raise balloon targets of the lowest-rho VMs, at most [`step`] of
//!   the shortfall per VM a period (at least [`MIN_STEP`] when there is room), down to their
//!   floors.
//! - **Give back.** Memory goes back (the balloon deflates) to a VM that lent it and needs it
//!   (active fraction at least [`NEEDY`] and less memory than its size), at most [`step`] of
//!   what it lent a period, when free memory or VMs of lower rho can cover it; and, while free
//!   memory is above the reserve plus the hysteresis ([`Settings::hysteresis`]), to the VMs
//!   that lent, highest rho first, at most [`STEP`] each a period (nobody is waiting for it).
//! - **Step.** The most one VM's balloon moves in a period grows with the shortfall: the
//!   shortfall itself, at least [`STEP`] and at most [`MAX_STEP`]. With a fixed 64 MiB, 1 GiB
//!   took 16 periods (about 20 s, docs/PERFORMANCE.md); with the bound at 256 MiB it takes 4.
//!   The bound keeps a period's move within what a guest's driver does in well under a period
//!   on an emulating host (inflating 1 GiB takes about 0.4 s here) and limits what a VM whose
//!   statistics lag a period (it just became busy) can lose before the policy sees it.

use serde::Serialize;

const MIB: u64 = 1 << 20;
/// The least memory the policy leaves a VM.
pub const MIN_FLOOR: u64 = 16 * MIB;
/// The most the policy moves into or out of one VM's balloon in one period for a shortfall
/// of this much or less (see [`step`]).
pub const STEP: u64 = 64 * MIB;
/// The most the policy moves into or out of one VM's balloon in one period, whatever the
/// shortfall.
pub const MAX_STEP: u64 = 256 * MIB;
/// The least the policy takes from a VM at once (less when that is all its room): a
/// shortfall of a few pages, as resident memory jitters, does not make a stream of tiny
/// requests.
pub const MIN_STEP: u64 = 4 * MIB;
/// The active fraction at and above which a VM that lent memory gets it back.
pub const NEEDY: f64 = 0.9;
/// ESX's idle-memory tax, the default.
pub const DEFAULT_TAX_PCT: u32 = 75;
/// The highest tax accepted (k = 1 / (1 - tax) stays finite).
pub const MAX_TAX_PCT: u32 = 99;

/// The policy's knobs (`wv host --host-memory-reserve SIZE --idle-memory-tax PCT
/// --host-memory SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Free host memory the policy keeps; 0: the policy is off.
    pub reserve: u64,
    /// The idle-memory tax, in percent (0 to [`MAX_TAX_PCT`]).
    pub tax_pct: u32,
    /// The memory the daemon's VMs may use in total, if limited: free memory is then the
    /// lesser of MemAvailable and this less the VMs' resident memory.
    pub host_memory: Option<u64>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            reserve: 0,
            tax_pct: DEFAULT_TAX_PCT,
            host_memory: None,
        }
    }
}

impl Settings {
    /// k = 1 / (1 - tax): what an idle page costs, in active pages.
    pub fn k(&self) -> f64 {
        1.0 / (1.0 - f64::from(self.tax_pct.min(MAX_TAX_PCT)) / 100.0)
    }

    /// Free memory above the reserve by this much before lent memory goes back unasked:
    /// a quarter of the reserve, at least 16 MiB.
    pub fn hysteresis(&self) -> u64 {
        (self.reserve / 4).max(16 * MIB)
    }
}

/// A running VM with a balloon, as the policy sees it in one period.
#[derive(Clone, Debug, PartialEq)]
pub struct Vm {
    /// Its world id.
    pub id: u64,
    /// Its CPU shares (the world's).
    pub shares: u32,
    /// Its configured memory, bytes.
    pub memory: u64,
    /// The balloon's target now, bytes (what the VM is asked to give back).
    pub target: u64,
    /// What the guest's balloon holds now, bytes (its `actual`).
    pub actual: u64,
    /// The part of the target the policy set (the rest was set by hand).
    pub lent: u64,
    /// The active fraction, if the guest sends statistics.
    pub active: Option<f64>,
}

impl Vm {
    /// Its memory now: its size less what its balloon holds.
    pub fn current(&self) -> u64 {
        self.memory.saturating_sub(self.actual)
    }

    /// The active fraction the policy uses (1 without statistics).
    pub fn f(&self) -> f64 {
        self.active.unwrap_or(1.0).clamp(0.0, 1.0)
    }
}

/// The active fraction from a guest's balloon statistics: 1 - available / total, with
/// `available_memory` (else `free_memory`) and `total_memory`; None without them.
pub fn active_fraction(
    available: Option<u64>,
    free: Option<u64>,
    total: Option<u64>,
) -> Option<f64> {
    let total = total.filter(|t| *t > 0)?;
    let avail = available.or(free)?.min(total);
    #[allow(clippy::cast_precision_loss)] // a fraction
    Some(1.0 - avail as f64 / total as f64)
}

/// ESX's shares per page with the idle tax: S / (P (f + k (1 - f))), P in 4 KiB pages.
pub fn priority(shares: u32, current: u64, f: f64, k: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // a ratio
    let pages = (current / 4096).max(1) as f64;
    let f = f.clamp(0.0, 1.0);
    f64::from(shares) / (pages * (f + k * (1.0 - f)))
}

/// The margin above its active memory a VM keeps: 1/32 of its size, at least 8 MiB.
pub fn margin(memory: u64) -> u64 {
    (memory / 32).max(8 * MIB)
}

/// The least memory the policy leaves a VM of `memory` bytes with `current` bytes now and
/// active fraction `f`: its active memory plus [`margin`] and at least its active memory over
/// [`NEEDY`], at least [`MIN_FLOOR`] and a quarter of its size, at most its size.
pub fn floor(memory: u64, current: u64, f: f64) -> u64 {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )] // a fraction of a memory size
    let active = (current as f64 * f.clamp(0.0, 1.0)) as u64;
    // At least active / NEEDY: at its floor a VM is never "needy", or two busy VMs would
    // hand the same memory back and forth every period.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let not_needy = (active as f64 / NEEDY).ceil() as u64;
    (active + margin(memory))
        .max(not_needy)
        .max(MIN_FLOOR)
        .max(memory / 4)
        .min(memory)
}

/// The most the policy moves into or out of one VM's balloon in one period for a shortfall
/// of `short` bytes (the host's memory below the reserve, or what a needy VM lent): the
/// shortfall itself, at least [`STEP`] and at most [`MAX_STEP`], in whole pages.
pub fn step(short: u64) -> u64 {
    short.clamp(STEP, MAX_STEP) & !4095
}

/// One change the policy makes: the VM's new lent amount (its balloon's policy part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The world id.
    pub id: u64,
    /// The policy's part of the balloon target, bytes (a multiple of 4 KiB).
    pub lent: u64,
}

/// What [`decide`] did in one period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The VMs whose lent amount changes.
    pub changes: Vec<Change>,
    /// One line for the report ("" when nothing changed).
    pub action: String,
}

/// One period of the policy: host free memory `free` (bytes, negative when the VMs use more
/// than the pool), the VMs with balloons. Returns the new lent amounts of the VMs whose
/// balloon target changes.
pub fn decide(s: &Settings, free: i64, vms: &[Vm]) -> Decision {
    let mut out = Decision::default();
    if s.reserve == 0 || vms.is_empty() {
        return out;
    }
    let k = s.k();
    let i = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    // What balloons still inflating will free, less what those deflating will take.
    let flight: i64 = vms.iter().map(|v| i(v.target) - i(v.actual)).sum();
    let mut free = free.saturating_add(flight);
    let reserve = i(s.reserve);
    let rho = |v: &Vm| priority(v.shares, v.current(), v.f(), k);
    let mut lent: Vec<u64> = vms.iter().map(|v| v.lent).collect();
    let mut target: Vec<u64> = vms.iter().map(|v| v.target).collect();
    let mut given = vec![false; vms.len()];
    // Room to reclaim from VM j in this period: down to its floor, counted from where its
    // balloon aims, at most `limit`.
    let room = |j: usize, target: &[u64], limit: u64| {
        let v = &vms[j];
        let fl = floor(v.memory, v.current(), v.f());
        v.memory
            .saturating_sub(target[j])
            .saturating_sub(fl)
            .min(limit)
            & !4095
    };
    let mut moved: Vec<String> = Vec::new();
    // 1. VMs that lent and need it back, highest priority first.
    let mut needy: Vec<usize> = (0..vms.len())
        .filter(|&j| {
            let v = &vms[j];
            v.lent > 0 && v.f() >= NEEDY && v.current() < v.memory
        })
        .collect();
    needy.sort_by(|&a, &b| rho(&vms[b]).total_cmp(&rho(&vms[a])));
    for &j in &needy {
        let mine = rho(&vms[j]);
        let limit = step(lent[j]);
        let cover: u64 = (0..vms.len())
            .filter(|&o| o != j && !given[o] && rho(&vms[o]) < mine)
            .map(|o| room(o, &target, limit))
            .sum::<u64>()
            + u64::try_from((free - reserve).max(0)).unwrap_or(0);
        let back = lent[j].min(limit).min(cover) & !4095;
        if back == 0 {
            continue;
        }
        lent[j] -= back;
        target[j] = target[j].saturating_sub(back);
        given[j] = true;
        free -= i(back);
        moved.push(format!(
            "gave {} back to world {} (it needs it)",
            mib(back),
            vms[j].id
        ));
    }
    // 2. Plenty free: give lent memory back, highest priority first.
    let hyst = i(s.hysteresis());
    if free > reserve + hyst {
        let mut surplus = u64::try_from(free - reserve - hyst).unwrap_or(0);
        let mut order: Vec<usize> = (0..vms.len()).filter(|&j| lent[j] > 0).collect();
        order.sort_by(|&a, &b| rho(&vms[b]).total_cmp(&rho(&vms[a])));
        for j in order {
            let back = lent[j].min(STEP).min(surplus) & !4095;
            if back == 0 {
                continue;
            }
            lent[j] -= back;
            target[j] = target[j].saturating_sub(back);
            given[j] = true;
            surplus -= back;
            free -= i(back);
            moved.push(format!(
                "gave {} back to world {} (free memory)",
                mib(back),
                vms[j].id
            ));
        }
    }
    // 3. Short: reclaim from the lowest priority first.
    if free < reserve {
        let mut need = u64::try_from(reserve - free).unwrap_or(0);
        let limit = step(need);
        let mut order: Vec<usize> = (0..vms.len()).filter(|&j| !given[j]).collect();
        order.sort_by(|&a, &b| rho(&vms[a]).total_cmp(&rho(&vms[b])));
        for j in order {
            if need == 0 {
                break;
            }
            let take = room(j, &target, limit).min(need.max(MIN_STEP).next_multiple_of(4096));
            if take == 0 {
                continue;
            }
            lent[j] += take;
            target[j] += take;
            need = need.saturating_sub(take);
            moved.push(format!("took {} from world {}", mib(take), vms[j].id));
        }
    }
    out.changes = (0..vms.len())
        .filter(|&j| lent[j] != vms[j].lent)
        .map(|j| Change {
            id: vms[j].id,
            lent: lent[j],
        })
        .collect();
    out.action = moved.join("; ");
    out
}

/// `bytes` in MiB with one decimal, for the report.
fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // for display
    let m = bytes as f64 / MIB as f64;
    format!("{m:.1} MiB")
}

/// The memory above its fair share each VM holds: fair = its shares over all the VMs'
/// shares times the memory they hold together (their current memory); borrowed = current -
/// fair when positive. By id.
pub fn borrowed(vms: &[Vm]) -> Vec<(u64, u64)> {
    let total: u64 = vms.iter().map(Vm::current).sum();
    let shares: u64 = vms.iter().map(|v| u64::from(v.shares)).sum();
    vms.iter()
        .map(|v| {
            let fair = if shares == 0 {
                0
            } else {
                u64::try_from(u128::from(total) * u128::from(v.shares) / u128::from(shares))
                    .unwrap_or(u64::MAX)
            };
            (v.id, v.current().saturating_sub(fair))
        })
        .collect()
}

/// MemAvailable from /proc/meminfo, bytes.
pub fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&m, "MemAvailable:")
}

/// A `kB` field of /proc/meminfo (or /proc/PID/status) text, in bytes.
pub fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The resident memory of process `pid` (VmRSS), bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    meminfo_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmRSS:",
    )
}

/// Host free memory for the policy: MemAvailable, or with a pool of `host_memory` bytes the
/// lesser of MemAvailable and the pool less `resident` (the VMs' resident memory).
pub fn host_free(available: u64, host_memory: Option<u64>, resident: u64) -> i64 {
    let avail = i64::try_from(available).unwrap_or(i64::MAX);
    match host_memory {
        None => avail,
        Some(h) => avail.min(
            i64::try_from(h)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(resident).unwrap_or(i64::MAX)),
        ),
    }
}

/// The policy's state, as reported (`GET /v1/host/memory`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Whether the policy runs (a reserve was given).
    pub enabled: bool,
    /// Free memory the policy keeps ([`Settings::reserve`]).
    pub reserve_bytes: u64,
    /// [`Settings::hysteresis`].
    pub hysteresis_bytes: u64,
    /// The idle-memory tax, percent.
    pub idle_memory_tax_pct: u32,
    /// The VMs' pool ([`Settings::host_memory`]), when limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_memory_bytes: Option<u64>,
    /// Host free memory at the last period, bytes (negative: the VMs use more than the pool).
    pub host_free_bytes: i64,
    /// MemAvailable at the last period.
    pub mem_available_bytes: u64,
    /// The resident memory of the daemon's VMMs at the last period.
    pub vms_resident_bytes: u64,
    /// Periods run.
    pub periods: u64,
    /// What the policy last did ("" when it never changed a target).
    pub last_action: String,
    /// Seconds since the epoch of the last action (0: none).
    pub last_action_at: u64,
    /// Every live world's memory.
    pub worlds: Vec<WorldMemory>,
}

/// One world's memory, as reported.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct WorldMemory {
    /// Its world id.
    pub id: u64,
    /// The VM's name.
    pub name: String,
    /// Its CPU shares, which are its memory shares too.
    pub shares: u32,
    /// Its configured memory.
    pub memory_bytes: u64,
    /// The guest's active fraction, if it sends statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_fraction: Option<f64>,
    /// The memory the VM is to keep (its size less the balloon's target).
    pub target_bytes: u64,
    /// The memory it has now (its size less what its balloon holds).
    pub current_bytes: u64,
    /// What its balloon holds because of the policy.
    pub lent_bytes: u64,
    /// Its current memory above its fair share ([`borrowed`]).
    pub borrowed_bytes: u64,
    /// The least memory the policy leaves it ([`floor`]).
    pub floor_bytes: u64,
    /// The policy's priority for it (reclaimed from the lowest first).
    pub priority: f64,
    /// The resident memory of its VMM, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: u64, shares: u32, current_mib: u64, f: f64, lent_mib: u64) -> Vm {
        Vm {
            id,
            shares,
            memory: 128 * MIB,
            target: (128 - current_mib) * MIB,
            actual: (128 - current_mib) * MIB,
            lent: lent_mib * MIB,
            active: Some(f),
        }
    }

    fn on(reserve_mib: u64) -> Settings {
        Settings {
            reserve: reserve_mib * MIB,
            ..Settings::default()
        }
    }

    #[test]
    fn the_idle_tax_makes_an_idle_page_cost_k_active_ones() {
        let k = on(1).k();
        assert!((k - 4.0).abs() < 1e-9);
        // Same shares and size: the idle VM has the lower priority.
        let idle = priority(1000, 128 * MIB, 0.1, k);
        let busy = priority(1000, 128 * MIB, 0.9, k);
        assert!(idle < busy);
        // Wholly active: shares per page.
        assert!((priority(1000, 4096 * 10, 1.0, k) - 100.0).abs() < 1e-9);
        // Tax 0: activity does not matter.
        let s0 = Settings {
            tax_pct: 0,
            ..on(1)
        };
        assert_eq!(
            priority(10, MIB, 0.1, s0.k()),
            priority(10, MIB, 0.9, s0.k())
        );
        // Twice the shares, twice the priority.
        assert!((priority(2000, MIB, 0.5, k) - 2.0 * priority(1000, MIB, 0.5, k)).abs() < 1e-12);
    }

    #[test]
    fn the_active_fraction_comes_from_the_guests_statistics() {
        assert_eq!(active_fraction(Some(25), Some(10), Some(100)), Some(0.75));
        assert_eq!(active_fraction(None, Some(10), Some(100)), Some(0.9));
        assert_eq!(active_fraction(Some(200), None, Some(100)), Some(0.0));
        assert_eq!(active_fraction(Some(1), None, None), None);
        assert_eq!(active_fraction(Some(1), None, Some(0)), None);
        assert_eq!(active_fraction(None, None, Some(100)), None);
    }

    #[test]
    fn the_floor_keeps_active_memory_a_margin_and_a_minimum() {
        // 40 MiB active of 128: 40 + 8.
        assert_eq!(floor(128 * MIB, 128 * MIB, 40.0 / 128.0), 48 * MIB);
        // Idle: a quarter of its size.
        assert_eq!(floor(128 * MIB, 128 * MIB, 0.0), 32 * MIB);
        // Small: 16 MiB.
        assert_eq!(floor(32 * MIB, 32 * MIB, 0.0), 16 * MIB);
        // Wholly active: all of it.
        assert_eq!(floor(128 * MIB, 128 * MIB, 1.0), 128 * MIB);
    }

    #[test]
    fn off_or_enough_memory_changes_nothing() {
        let vms = [vm(1, 1000, 128, 0.1, 0), vm(2, 1000, 128, 0.9, 0)];
        assert_eq!(decide(&Settings::default(), 0, &vms), Decision::default());
        assert_eq!(decide(&on(32), 100 << 20, &vms), Decision::default());
    }

    #[test]
    fn memory_is_reclaimed_from_the_lowest_priority_first_down_to_its_floor() {
        let vms = [vm(1, 1000, 128, 0.9, 0), vm(2, 1000, 128, 0.2, 0)];
        // 20 MiB short of a 32 MiB reserve: the idle VM gives 20.
        let d = decide(&on(32), 12 << 20, &vms);
        assert_eq!(
            d.changes,
            vec![Change {
                id: 2,
                lent: 20 * MIB
            }]
        );
        assert!(
            d.action.contains("took 20.0 MiB from world 2"),
            "{}",
            d.action
        );
        // 200 MiB short: the idle one down to its floor (a step of the shortfall covers it);
        // the busy one (90% active) is at its floor at its whole size (its active memory over
        // NEEDY), so nothing from it: it would be needy at once and take it back.
        let d = decide(&on(32), -168 << 20, &vms);
        let idle_room = (128 * MIB - floor(128 * MIB, 128 * MIB, 0.2)) & !4095;
        assert!(idle_room > STEP, "{idle_room}");
        assert_eq!(
            d.changes,
            vec![Change {
                id: 2,
                lent: idle_room
            }],
            "{d:?}"
        );
        // 80% active: down to its floor (0.8 * 128 / 0.9 = 113.8 MiB, above active + 8 MiB):
        // 14 MiB and a bit, whole pages.
        let vms80 = [vm(1, 1000, 128, 0.8, 0), vm(2, 1000, 128, 0.2, 0)];
        let d = decide(&on(32), -168 << 20, &vms80);
        assert_eq!(d.changes.len(), 2, "{d:?}");
        let busy = d.changes[0];
        assert_eq!(busy.id, 1);
        assert!(busy.lent > 14 * MIB && busy.lent < 15 * MIB, "{busy:?}");
        // A shortfall of a page: at least MIN_STEP, not a stream of tiny requests.
        let d = decide(&on(32), (32 << 20) - 4096, &vms);
        assert_eq!(
            d.changes,
            vec![Change {
                id: 2,
                lent: MIN_STEP
            }]
        );
        // More shares protect a VM: the idle one with 10x the shares is now spared (the other
        // half active, below its floor's reach).
        let vms = [vm(1, 1000, 128, 0.5, 0), vm(2, 10000, 128, 0.2, 0)];
        let d = decide(&on(32), 28 << 20, &vms);
        assert_eq!(
            d.changes,
            vec![Change {
                id: 1,
                lent: 4 * MIB
            }]
        );
    }

    #[test]
    fn a_balloon_still_inflating_counts_as_freed() {
        let mut v = vm(2, 1000, 128, 0.2, 20);
        v.target = 20 * MIB;
        v.actual = 0;
        // 20 MiB short, 20 MiB on the way: nothing more.
        let d = decide(&on(32), 12 << 20, &[vm(1, 1000, 128, 0.9, 0), v]);
        assert_eq!(d.changes, vec![]);
    }

    #[test]
    fn a_needy_vm_gets_its_memory_back_from_an_idle_one() {
        // VM 1 lent 80 MiB and is now wholly active; VM 2 is idle at full size.
        let vms = [vm(1, 1000, 48, 1.0, 80), vm(2, 1000, 128, 0.3, 0)];
        // Exactly at the reserve: VM 1 gets all of it back (a step of 80 MiB), VM 2 gives it.
        let d = decide(&on(32), 32 << 20, &vms);
        assert_eq!(
            d.changes,
            vec![
                Change { id: 1, lent: 0 },
                Change {
                    id: 2,
                    lent: 80 * MIB
                },
            ]
        );
        // Nobody with a lower priority has room, and no free memory: nothing moves.
        let vms = [vm(1, 1000, 48, 1.0, 80), vm(2, 1000, 48, 0.95, 80)];
        let d = decide(&on(32), 32 << 20, &vms);
        assert_eq!(d.changes, vec![]);
    }

    /// The step grows with the shortfall, bounded: 1 GiB moves from an idle VM to a needy one
    /// MAX_STEP a period, not STEP.
    #[test]
    fn a_large_shortfall_moves_a_larger_step() {
        assert_eq!(step(0), STEP);
        assert_eq!(step(STEP / 2), STEP);
        assert_eq!(step(100 * MIB), 100 * MIB);
        assert_eq!(step(100 * MIB + 5), 100 * MIB);
        assert_eq!(step(1 << 40), MAX_STEP);
        let big = |id, current_mib: u64, f, lent_mib| Vm {
            memory: 1536 * MIB,
            target: (1536 - current_mib) * MIB,
            actual: (1536 - current_mib) * MIB,
            ..vm(id, 1000, 128, f, lent_mib)
        };
        // VM 1 (1536 MiB) lent 1 GiB and is now wholly active; VM 2 is idle at full size.
        let vms = [big(1, 512, 1.0, 1024), big(2, 1536, 0.1, 0)];
        let d = decide(&on(64), 64 << 20, &vms);
        assert_eq!(
            d.changes,
            vec![
                Change {
                    id: 1,
                    lent: 1024 * MIB - MAX_STEP
                },
                Change {
                    id: 2,
                    lent: MAX_STEP
                },
            ],
            "{d:?}"
        );
        // 1 GiB short and nobody needy: the idle VM gives MAX_STEP this period.
        let vms = [big(1, 1536, 0.95, 0), big(2, 1536, 0.1, 0)];
        let d = decide(&on(64), (64 << 20) - (1 << 30), &vms);
        assert_eq!(
            d.changes,
            vec![Change {
                id: 2,
                lent: MAX_STEP
            }],
            "{d:?}"
        );
    }

    #[test]
    fn plenty_of_free_memory_goes_back_to_the_highest_priority_first() {
        let vms = [vm(1, 1000, 64, 0.5, 64), vm(2, 1000, 100, 0.2, 28)];
        // 32 reserve + 16 hysteresis; 60 free: 12 MiB back, to VM 1 (fewer pages, busier).
        let d = decide(&on(32), 60 << 20, &vms);
        assert_eq!(
            d.changes,
            vec![Change {
                id: 1,
                lent: 52 * MIB
            }]
        );
        // Lots free: both get a step back, lent never below 0.
        let d = decide(&on(32), 1 << 40, &vms);
        assert_eq!(
            d.changes,
            vec![Change { id: 1, lent: 0 }, Change { id: 2, lent: 0 }]
        );
    }

    #[test]
    fn borrowed_is_memory_above_the_share_of_what_the_vms_hold() {
        let vms = [vm(1, 1000, 128, 0.5, 0), vm(2, 1000, 48, 0.2, 80)];
        assert_eq!(borrowed(&vms), vec![(1, 40 * MIB), (2, 0)]);
        let vms = [vm(1, 3000, 96, 0.5, 0), vm(2, 1000, 32, 0.2, 0)];
        assert_eq!(borrowed(&vms), vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn host_free_is_the_lesser_of_memavailable_and_the_pool() {
        assert_eq!(host_free(100, None, 50), 100);
        assert_eq!(host_free(100, Some(120), 50), 70);
        assert_eq!(host_free(100, Some(40), 50), -10);
        let m = "MemTotal:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_field(m, "MemAvailable:"), Some(2 << 20));
        assert_eq!(meminfo_field(m, "Nope:"), None);
        assert!(mem_available().is_some());
    }
}
