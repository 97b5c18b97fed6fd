//! The daemon's side of memory lending ([`crate::lending`]): the policy thread (once a second
//! while `wv host --host-memory-reserve` is given), the sampling of the VMs' balloons and
//! resident memory, the targets it sets through the VMMs' control sockets, and the report
//! (`GET /v1/host/memory`, the `memory` of `GET /v1/vms/{name}`).

use super::{is_live, ok, Daemon, Reply, VMM_READ_TIMEOUT};
use crate::helper;
use crate::http;
use crate::lending::{self, Report, Settings, WorldMemory};
use crate::supervisor;
use crate::world::State;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The policy's period.
const PERIOD: Duration = Duration::from_secs(1);

/// What the policy holds of one world's balloon.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Held {
    /// The VMM this belongs to (a new run starts with an empty balloon).
    pid: u32,
    /// The balloon bytes set by hand (`PUT /v1/vms/{name}/balloon`).
    manual: u64,
    /// The balloon bytes the policy added.
    lent: u64,
}

/// The policy's settings and state.
#[derive(Default)]
pub(super) struct Lending {
    settings: Settings,
    held: HashMap<u64, Held>,
    report: Report,
}

/// One live world as sampled.
struct Sample {
    id: u64,
    name: String,
    shares: u32,
    memory: u64,
    vmm: u32,
    rss: Option<u64>,
    /// (target, actual, active fraction) of its balloon, when it has one and answered.
    balloon: Option<(u64, u64, Option<f64>)>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Daemon {
    /// Turns the memory lending policy on with `s` (`wv host --host-memory-reserve`): a thread
    /// runs it once a second while the reserve is above 0. The settings are reported either
    /// way. Call once, before serving.
    pub fn lend_memory(self: &Arc<Self>, s: Settings) -> Result<(), String> {
        if s.tax_pct > lending::MAX_TAX_PCT {
            return Err(format!(
                "idle memory tax {}% out of range: 0 to {}",
                s.tax_pct,
                lending::MAX_TAX_PCT
            ));
        }
        self.lending().settings = s;
        if s.reserve > 0 {
            let d = self.clone();
            helper::spawn("lending", move || loop {
                std::thread::sleep(PERIOD);
                if d.closing.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                d.memory_period(true);
            })
            .map_err(|e| format!("cannot start the policy thread: {e}"))?;
        }
        Ok(())
    }

    pub(super) fn lending(&self) -> std::sync::MutexGuard<'_, Lending> {
        self.lending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a target set by hand for world `id` (VMM `pid`): `balloon` bytes, which the
    /// policy then builds on (it lends nothing more of that VM until it next decides to).
    pub(super) fn manual_balloon(&self, id: u64, pid: Option<u32>, balloon: u64) {
        let pid = pid.map(supervisor::vmm_process).unwrap_or(0);
        self.lending().held.insert(
            id,
            Held {
                pid,
                manual: balloon,
                lent: 0,
            },
        );
    }

    /// The live worlds' memory now: each VM's VMM's resident memory, and the balloon of each
    /// running one with a balloon (its VMM's `GET /vm/balloon`, [`VMM_READ_TIMEOUT`] at most).
    fn sample_memory(&self) -> Vec<Sample> {
        let live: Vec<(u64, String, u32, u64, bool, u32)> = {
            let doc = self.lock();
            doc.worlds
                .iter()
                .filter(|w| is_live(w.state) && self.run_of(w.id).is_some())
                .filter_map(|w| {
                    Some((
                        w.id,
                        w.spec.name.clone(),
                        w.spec.shares,
                        w.spec.config.memory,
                        w.spec.config.balloon && w.state == State::Running,
                        w.pid?,
                    ))
                })
                .collect()
        };
        live.into_iter()
            .map(|(id, name, shares, memory, balloon, pid)| {
                let vmm = supervisor::vmm_process(pid);
                let v = balloon.then(|| self.read_balloon(&name)).flatten();
                let rss = lending::rss_of(vmm).or_else(|| v.as_ref()?["vmm_rss_bytes"].as_u64());
                let balloon = v.map(|b| {
                    let n = |k: &str| b[k].as_u64().unwrap_or(0).min(memory);
                    let st = |k: &str| b["stats"][k].as_u64();
                    (
                        n("target_bytes"),
                        // What the VMM itself released, not the guest's word (`actual`):
                        // a guest claiming a full balloon must not pass for a small VM.
                        n("ballooned_bytes"),
                        lending::active_fraction(
                            st("available_memory"),
                            st("free_memory"),
                            st("total_memory"),
                        ),
                    )
                });
                Sample {
                    id,
                    name,
                    shares,
                    memory,
                    vmm,
                    rss,
                    balloon,
                }
            })
            .collect()
    }

    fn read_balloon(&self, name: &str) -> Option<serde_json::Value> {
        let sock = self.store.vm_dir(name).ok()?.join(supervisor::API_SOCKET);
        match http::request_with(
            &sock,
            "GET",
            "/vm/balloon",
            None,
            None,
            Some(VMM_READ_TIMEOUT),
        ) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// One period: samples, decides when `act` and the policy is on, sets the targets that
    /// change, and keeps the report.
    pub(super) fn memory_period(&self, act: bool) -> Report {
        let samples = self.sample_memory();
        let settings = self.lending().settings;
        let available = lending::mem_available().unwrap_or(0);
        let resident: u64 = samples.iter().filter_map(|s| s.rss).sum();
        let free = lending::host_free(available, settings.host_memory, resident);
        // The VMs the policy manages, with what it holds of each.
        let mut vms = Vec::new();
        {
            let mut l = self.lending();
            l.held.retain(|id, _| samples.iter().any(|s| s.id == *id));
            for s in &samples {
                let Some((target, actual, active)) = s.balloon else {
                    continue;
                };
                let h = l.held.entry(s.id).or_default();
                if h.pid != s.vmm {
                    // A VMM the policy has not seen: what its balloon aims at is not ours.
                    *h = Held {
                        pid: s.vmm,
                        manual: target,
                        lent: 0,
                    };
                }
                // A target set by hand since: what is above the policy's part is the hand's.
                h.manual = target.saturating_sub(h.lent);
                vms.push(lending::Vm {
                    id: s.id,
                    shares: s.shares,
                    memory: s.memory,
                    target,
                    actual,
                    lent: h.lent,
                    active,
                });
            }
        }
        let decision = if act && settings.reserve > 0 {
            lending::decide(&settings, free, &vms)
        } else {
            lending::Decision::default()
        };
        let mut done = Vec::new();
        for c in &decision.changes {
            let Some(s) = samples.iter().find(|s| s.id == c.id) else {
                continue;
            };
            let manual = self.lending().held.get(&c.id).map_or(0, |h| h.manual);
            let target = (manual + c.lent).min(s.memory);
            if self.set_balloon(&s.name, target) {
                if let Some(h) = self.lending().held.get_mut(&c.id) {
                    h.lent = c.lent;
                }
                if let Some(v) = vms.iter_mut().find(|v| v.id == c.id) {
                    v.target = target;
                    v.lent = c.lent;
                }
                done.push(c.id);
            } else {
                eprintln!(
                    "wv host: memory policy: VM '{}': could not set its balloon target",
                    s.name
                );
            }
        }
        let borrowed = lending::borrowed(&vms);
        let k = settings.k();
        let worlds = samples
            .iter()
            .map(|s| {
                let v = vms.iter().find(|v| v.id == s.id);
                let memory = s.memory;
                WorldMemory {
                    id: s.id,
                    name: s.name.clone(),
                    shares: s.shares,
                    memory_bytes: memory,
                    active_fraction: v.and_then(|v| v.active),
                    target_bytes: v.map_or(memory, |v| memory.saturating_sub(v.target)),
                    current_bytes: v.map_or(memory, lending::Vm::current),
                    lent_bytes: v.map_or(0, |v| v.lent.min(v.actual)),
                    borrowed_bytes: borrowed
                        .iter()
                        .find(|(id, _)| *id == s.id)
                        .map_or(0, |(_, b)| *b),
                    floor_bytes: v.map_or(memory, |v| lending::floor(v.memory, v.current(), v.f())),
                    priority: v.map_or(0.0, |v| lending::priority(v.shares, v.current(), v.f(), k)),
                    rss_bytes: s.rss,
                }
            })
            .collect();
        let mut l = self.lending();
        let r = &mut l.report;
        r.enabled = settings.reserve > 0;
        r.reserve_bytes = settings.reserve;
        r.hysteresis_bytes = settings.hysteresis();
        r.idle_memory_tax_pct = settings.tax_pct;
        r.host_memory_bytes = settings.host_memory;
        r.host_free_bytes = free;
        r.mem_available_bytes = available;
        r.vms_resident_bytes = resident;
        r.worlds = worlds;
        if act {
            r.periods += 1;
        }
        if !done.is_empty() {
            r.last_action = decision.action;
            r.last_action_at = now_secs();
        }
        r.clone()
    }

    /// Sets VM `name`'s balloon to `bytes` through its VMM; whether it took it.
    fn set_balloon(&self, name: &str, bytes: u64) -> bool {
        let Ok(dir) = self.store.vm_dir(name) else {
            return false;
        };
        let req = serde_json::json!({ "target_bytes": bytes }).to_string();
        matches!(
            http::request_with(
                &dir.join(supervisor::API_SOCKET),
                "PUT",
                "/vm/balloon",
                Some(&req),
                None,
                Some(VMM_READ_TIMEOUT * 2),
            ),
            Ok((204, _))
        )
    }

    /// `GET /v1/host/memory`: the policy's settings and state, and every live world's memory
    /// (sampled now when the policy is off; its last period's otherwise).
    pub(super) fn host_memory(&self) -> Reply {
        let (on, last) = {
            let l = self.lending();
            (
                l.settings.reserve > 0 && l.report.periods > 0,
                l.report.clone(),
            )
        };
        if on {
            ok(200, &last)
        } else {
            ok(200, &self.memory_period(false))
        }
    }

    /// The lending policy's gauges for `/metrics`, from its last period, while it runs.
    pub(super) fn memory_metrics(&self, t: &mut crate::metrics::Text) {
        let r = {
            let l = self.lending();
            if l.settings.reserve == 0 || l.report.periods == 0 {
                return;
            }
            l.report.clone()
        };
        #[allow(clippy::cast_precision_loss)] // a gauge
        let f = |b: u64| b as f64;
        let each = |g: &dyn Fn(&WorldMemory) -> Option<f64>| -> crate::metrics::Samples {
            r.worlds
                .iter()
                .filter_map(|w| {
                    Some((
                        vec![("world", w.name.clone()), ("id", w.id.to_string())],
                        g(w)?,
                    ))
                })
                .collect()
        };
        #[allow(clippy::cast_precision_loss)] // a gauge
        let free = r.host_free_bytes as f64;
        t.family(
            "wv_host_memory_free_bytes",
            "gauge",
            "Host free memory as the lending policy saw it at its last period (MemAvailable, or the VMs' pool less their resident memory if less), bytes.",
            &vec![(Vec::new(), free)],
        );
        t.family(
            "wv_world_memory_current_bytes",
            "gauge",
            "A VM's memory less what its balloon holds, bytes (lending policy).",
            &each(&|w| Some(f(w.current_bytes))),
        );
        t.family(
            "wv_world_memory_lent_bytes",
            "gauge",
            "What a VM's balloon holds because of the lending policy, bytes.",
            &each(&|w| Some(f(w.lent_bytes))),
        );
        t.family(
            "wv_world_memory_borrowed_bytes",
            "gauge",
            "A VM's current memory above its fair share (the VMs' current memory split by shares), bytes.",
            &each(&|w| Some(f(w.borrowed_bytes))),
        );
        t.family(
            "wv_world_memory_active_ratio",
            "gauge",
            "A VM's active fraction from its guest's balloon statistics (1 - available/total).",
            &each(&|w| w.active_fraction),
        );
    }

    /// World `id`'s memory in the policy's last report, if it has one.
    pub(super) fn world_memory(&self, id: u64) -> Option<WorldMemory> {
        let l = self.lending();
        if l.settings.reserve == 0 {
            return None;
        }
        l.report.worlds.iter().find(|w| w.id == id).cloned()
    }
}
