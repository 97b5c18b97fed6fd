//! I/O shares for the switch and the storage service: one mClock-style scheduler ([`Sched`],
//! pure, driven by a clock the caller passes) and a blocking dispatcher over it ([`Gate`]).
//!
//! Each flow (a switch port, a disk) has a reservation and a limit (units per second, 0 for
//! none) and shares. A flow with a request waiting is *backlogged*. Three tags per flow, as in
//! mClock (Gulati et al., OSDI 2010), computed when a request is dispatched rather than when it
//! arrives (each flow here is served in order, so only its head request has tags):
//! - `r`: when its reservation entitles it to its next request; advanced by `cost/reservation`
//!   by requests served *for* the reservation only;
//! - `l`: when its limit lets it have its next request; advanced by `cost/limit` by every request;
//! - `p`: its virtual finish time by shares (start-time fair queueing); advanced by
//!   `cost/shares` by every request.
//!
//! A dispatch ([`Sched::pick`]) first serves, by earliest `r`, a backlogged flow whose `r` has
//! come (reservations are met first); otherwise the backlogged flow of least `p` whose `l` has
//! come (the rest divided by shares, never past a limit); otherwise nothing until the earliest
//! `l` comes. A request served for the reservation also advances `p`, so a flow gets the larger
//! of its reservation and its share, not their sum. A resource capacity (units per second), when
//! set, is one more tag that every dispatch advances: the resource is then contended exactly
//! when demand exceeds it.
//!
//! A flow served by one thread that asks for one request at a time (a switch port's transmit
//! thread) is not backlogged between a grant and its thread's next [`Gate::acquire`], and a
//! dispatch made in that gap divides the resource among the others only: flattened shares. So a
//! caller that knows its flow has more to ask for ([`Gate::acquire_with`] `then_more`) keeps it
//! backlogged after the grant: when its turn comes before its thread is back, the gate waits
//! for it at most the gate's *anticipation* ([`Gate::set_anticipation`]), then gives the turn to
//! the next (anticipatory scheduling, Iyer and Druschel, SOSP 2001). A capacity's tag lags
//! while the gate waits, and catches up (within the burst) once the flow is back, so the wait
//! costs the resource nothing when it is a rate.
//!
//! Idle credit is bounded: whenever a flow is dispatched or becomes backlogged, `r` and `l` are
//! kept no further behind the clock than `burst` units' worth of their rate, and `p` no further
//! behind the virtual time (the latest start tag served by shares) than `burst/shares`; so a flow back
//! from idle gets at most `burst` units ahead of its entitlement, and a flow served only by
//! shares for a while does not bank reservation.

#![allow(clippy::cast_possible_truncation)] // tags are f64 nanoseconds, rounded up to u64 ones

use serde::Serialize;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Shares a flow has when nothing was set (ESX's "normal").
pub const DEFAULT_SHARES: u32 = 1000;
/// Most shares a flow may have.
pub const MAX_SHARES: u32 = 1_000_000;

/// A flow's reservation, limit and shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Its weight against the other backlogged flows (1..=[`MAX_SHARES`]).
    pub shares: u32,
    /// Units per second it gets whenever it asks for them (0: none).
    pub reservation: u64,
    /// Units per second it never exceeds (0: none).
    pub limit: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            shares: DEFAULT_SHARES,
            reservation: 0,
            limit: 0,
        }
    }
}

impl Settings {
    /// Whether the settings make sense: shares in range, a reservation within the limit.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_SHARES).contains(&self.shares) {
            return Err(format!("shares={}: use 1-{MAX_SHARES}", self.shares));
        }
        if self.limit != 0 && self.reservation > self.limit {
            return Err(format!(
                "reservation {} is above the limit {}",
                self.reservation, self.limit
            ));
        }
        Ok(())
    }
}

/// Why a flow was dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// For its reservation.
    Reservation,
    /// By its shares.
    Shares,
}

/// What [`Sched::pick`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Dispatch flow `.0`'s request.
    Go(usize, Phase),
    /// Nothing may go before this time (ns).
    Wait(u64),
    /// No flow is backlogged.
    Idle,
}

/// What one flow got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct FlowStats {
    /// Units dispatched.
    pub served: f64,
    /// Of them, for the reservation.
    pub reserved: f64,
    /// Requests dispatched.
    pub requests: u64,
    /// Requests that had to wait (for their turn, their limit or the resource).
    pub delayed: u64,
    /// Requests that gave up waiting.
    pub timeouts: u64,
    /// Units per second over the last whole window of at least a second.
    pub rate: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tags {
    r: f64,
    l: f64,
    p: f64,
}

#[derive(Debug)]
struct Flow {
    id: usize,
    set: Settings,
    tags: Tags,
    waiting: bool,
    stats: FlowStats,
    win_start: u64,
    win_units: f64,
}

const NS: f64 = 1e9;
const RATE_WINDOW: u64 = 1_000_000_000;

/// The scheduler: flows, their tags, the virtual time and an optional capacity. Time is in
/// nanoseconds of any clock the caller keeps monotonic.
#[derive(Debug)]
pub struct Sched {
    flows: Vec<Flow>,
    vtime: f64,
    capacity: u64,
    cap_tag: f64,
    burst: f64,
}

impl Sched {
    /// A scheduler for a resource of `capacity` units per second (0: unknown, the caller
    /// finds out when it is full), letting idle flows bank at most `burst` units.
    pub fn new(capacity: u64, burst: f64) -> Sched {
        Sched {
            flows: Vec::new(),
            vtime: 0.0,
            capacity,
            cap_tag: 0.0,
            burst: burst.max(0.0),
        }
    }

    /// Sets the resource's capacity (units per second, 0: none).
    pub fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity;
    }

    /// The resource's capacity.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn flow(&mut self, id: usize) -> &mut Flow {
        let i = match self.flows.iter().position(|f| f.id == id) {
            Some(i) => i,
            None => {
                self.flows.push(Flow {
                    id,
                    set: Settings::default(),
                    tags: Tags::default(),
                    waiting: false,
                    stats: FlowStats::default(),
                    win_start: 0,
                    win_units: 0.0,
                });
                self.flows.len() - 1
            }
        };
        &mut self.flows[i]
    }

    /// Sets flow `id`'s settings (adding the flow).
    pub fn set(&mut self, id: usize, s: Settings) {
        self.flow(id).set = s;
    }

    /// Flow `id`'s settings, if it is known.
    pub fn settings(&self, id: usize) -> Option<Settings> {
        self.flows.iter().find(|f| f.id == id).map(|f| f.set)
    }

    /// Forgets flow `id`.
    pub fn remove(&mut self, id: usize) {
        self.flows.retain(|f| f.id != id);
    }

    /// Flow `id`'s counters.
    pub fn stats(&self, id: usize) -> Option<FlowStats> {
        self.flows.iter().find(|f| f.id == id).map(|f| f.stats)
    }

    /// Keeps `t` no more than `units` of `rate` behind `now`.
    fn floor(t: f64, now: u64, units: f64, rate: u64) -> f64 {
        if rate == 0 {
            return t;
        }
        t.max(now as f64 - units * NS / rate as f64)
    }

    /// Flow `id` has a request waiting (adds it with default settings if unknown).
    pub fn backlog(&mut self, id: usize, now: u64) {
        let (burst, vtime) = (self.burst, self.vtime);
        let f = self.flow(id);
        if !f.waiting {
            f.waiting = true;
            f.tags.r = Self::floor(f.tags.r, now, burst, f.set.reservation);
            f.tags.l = Self::floor(f.tags.l, now, burst, f.set.limit);
            f.tags.p = f.tags.p.max(vtime - burst / f64::from(f.set.shares.max(1)));
        }
    }

    /// Flow `id` has nothing waiting any more.
    pub fn unbacklog(&mut self, id: usize) {
        if let Some(f) = self.flows.iter_mut().find(|f| f.id == id) {
            f.waiting = false;
        }
    }

    /// Whether flow `id` is backlogged.
    pub fn is_backlogged(&self, id: usize) -> bool {
        self.flows.iter().any(|f| f.id == id && f.waiting)
    }

    /// Which backlogged flow goes next at `now`.
    pub fn pick(&self, now: u64) -> Pick {
        let t = now as f64;
        if !self.flows.iter().any(|f| f.waiting) {
            return Pick::Idle;
        }
        if self.capacity != 0 && self.cap_tag > t {
            return Pick::Wait(self.cap_tag.ceil() as u64);
        }
        let mut best: Option<(&Flow, f64)> = None;
        for f in self
            .flows
            .iter()
            .filter(|f| f.waiting && f.set.reservation != 0)
        {
            if f.tags.r <= t && best.is_none_or(|(_, r)| f.tags.r < r) {
                best = Some((f, f.tags.r));
            }
        }
        if let Some((f, _)) = best {
            return Pick::Go(f.id, Phase::Reservation);
        }
        let mut next = f64::INFINITY;
        for f in self.flows.iter().filter(|f| f.waiting) {
            if f.set.limit != 0 && f.tags.l > t {
                next = next.min(f.tags.l);
                if f.set.reservation != 0 {
                    next = next.min(f.tags.r);
                }
            } else if best.is_none_or(|(_, p)| f.tags.p < p) {
                best = Some((f, f.tags.p));
            }
        }
        match best {
            Some((f, _)) => Pick::Go(f.id, Phase::Shares),
            None => Pick::Wait(next.ceil() as u64),
        }
    }

    /// Flow `id` was dispatched a request of `cost` units at `now`, for `phase`: its tags
    /// (and the resource's) advance. It stays backlogged (call [`Sched::unbacklog`] if it
    /// has no more).
    pub fn charge(&mut self, id: usize, cost: f64, now: u64, phase: Phase) {
        let burst = self.burst;
        if self.capacity != 0 {
            self.cap_tag = Self::floor(self.cap_tag, now, burst, self.capacity)
                + cost * NS / self.capacity as f64;
        }
        let mut vtime = self.vtime;
        let f = self.flow(id);
        let s = f.set;
        f.tags.r = Self::floor(f.tags.r, now, burst, s.reservation);
        if phase == Phase::Reservation && s.reservation != 0 {
            f.tags.r += cost * NS / s.reservation as f64;
            f.stats.reserved += cost;
        }
        if s.limit != 0 {
            f.tags.l = Self::floor(f.tags.l, now, burst, s.limit) + cost * NS / s.limit as f64;
        }
        if phase == Phase::Shares {
            // The virtual time follows what is divided by shares only: a flow served for its
            // reservation runs ahead of it without dragging the others along.
            vtime = vtime.max(f.tags.p);
        }
        f.tags.p += cost / f64::from(s.shares.max(1));
        f.stats.served += cost;
        f.stats.requests += 1;
        if now.saturating_sub(f.win_start) >= RATE_WINDOW {
            if f.win_start != 0 {
                f.stats.rate = f.win_units * NS / (now - f.win_start) as f64;
            }
            f.win_start = now;
            f.win_units = 0.0;
        }
        f.win_units += cost;
        self.vtime = vtime;
    }

    fn tags(&self, id: usize) -> (Tags, f64, f64) {
        let t = self
            .flows
            .iter()
            .find(|f| f.id == id)
            .map(|f| f.tags)
            .unwrap_or_default();
        (t, self.cap_tag, self.vtime)
    }

    fn restore(&mut self, id: usize, saved: (Tags, f64, f64), cost: f64) {
        let Some(f) = self.flows.iter_mut().find(|f| f.id == id) else {
            return; // removed meanwhile
        };
        f.tags = saved.0;
        f.stats.served -= cost;
        f.stats.requests -= 1;
        f.win_units = (f.win_units - cost).max(0.0);
        self.cap_tag = saved.1;
        self.vtime = saved.2;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct GateState {
    sched: Sched,
    outstanding: usize,
    max_outstanding: usize,
    /// The resource said it is full: nothing is dispatched before this time or a
    /// [`Gate::kick`].
    stalled_until: Option<u64>,
    /// The flow whose thread was last woken to take its turn (not again until it does).
    woken: Option<usize>,
    /// Flows whose thread is in [`Gate::acquire`] (kept allocated: no allocation per request).
    inside: Vec<usize>,
    /// Flows kept backlogged after a grant while their thread is away, until when (ns).
    held: Vec<(usize, u64)>,
    /// How long a held flow's turn is kept for it (ns).
    anticipation: u64,
    /// Set by [`Gate::close`]: every wait ends, nothing is granted.
    closed: bool,
    /// Threads asleep on the condition variable: a change wakes them only if there are any
    /// (a notification is a system call; most requests find nobody waiting).
    sleepers: usize,
}

impl GateState {
    /// Ends the holds that ran out at `now` (their flows stop being backlogged); the earliest
    /// one left.
    fn expire_holds(&mut self, now: u64) -> Option<u64> {
        let mut next = None::<u64>;
        let mut i = 0;
        while i < self.held.len() {
            let (f, until) = self.held[i];
            if until <= now {
                self.held.swap_remove(i);
                if !self.inside.contains(&f) {
                    self.sched.unbacklog(f);
                }
            } else {
                next = Some(next.map_or(until, |n| n.min(until)));
                i += 1;
            }
        }
        next
    }

    fn unhold(&mut self, id: usize) {
        self.held.retain(|&(f, _)| f != id);
    }

    fn leave(&mut self, id: usize) {
        if let Some(i) = self.inside.iter().position(|&f| f == id) {
            self.inside.swap_remove(i);
        }
    }
}

/// A dispatcher over a [`Sched`] for threads that each serve one flow: [`Gate::acquire`]
/// blocks the calling thread until its flow's request may go, and keeps at most
/// `max_outstanding` requests dispatched and not yet [`Gate::release`]d.
pub struct Gate {
    st: Mutex<GateState>,
    cv: Condvar,
    epoch: Instant,
}

/// A request let through by [`Gate::acquire`]: release it when done (or [`Gate::refund`]
/// it if the resource could not take it after all).
#[must_use]
pub struct Grant {
    id: usize,
    cost: f64,
    saved: (Tags, f64, f64),
    /// Why it was let through.
    pub phase: Phase,
    /// Whether it had to wait.
    pub waited: bool,
}

impl Gate {
    /// A gate for a resource of `capacity` units per second (0: unknown) taking at most
    /// `max_outstanding` requests at a time; idle flows bank at most `burst` units.
    pub fn new(capacity: u64, max_outstanding: usize, burst: f64) -> Gate {
        Gate {
            st: Mutex::new(GateState {
                sched: Sched::new(capacity, burst),
                outstanding: 0,
                max_outstanding: max_outstanding.max(1),
                stalled_until: None,
                woken: None,
                inside: Vec::new(),
                held: Vec::new(),
                anticipation: 0,
                closed: false,
                sleepers: 0,
            }),
            cv: Condvar::new(),
            epoch: Instant::now(),
        }
    }

    /// Releases the state and wakes the threads asleep in [`Gate::acquire`], if any.
    fn wake(&self, st: MutexGuard<'_, GateState>) {
        let any = st.sleepers > 0;
        drop(st);
        if any {
            self.cv.notify_all();
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sets flow `id`'s settings.
    pub fn set(&self, id: usize, s: Settings) {
        let mut st = lock(&self.st);
        st.sched.set(id, s);
        self.wake(st);
    }

    /// Adds flow `id` with settings `s` if it is not known (a known one keeps its own).
    pub fn ensure(&self, id: usize, s: Settings) {
        let mut st = lock(&self.st);
        if st.sched.settings(id).is_none() {
            st.sched.set(id, s);
        }
    }

    /// Flow `id`'s settings, if known.
    pub fn settings(&self, id: usize) -> Option<Settings> {
        lock(&self.st).sched.settings(id)
    }

    /// Forgets flow `id` (a thread of it waiting in [`Gate::acquire`] gets None at once).
    pub fn remove(&self, id: usize) {
        let mut st = lock(&self.st);
        st.sched.remove(id);
        st.unhold(id);
        self.wake(st);
    }

    /// Sets how long the turn of a flow that said it has more ([`Gate::acquire_with`]) is kept
    /// for it while its thread is away (0: not at all, the default).
    pub fn set_anticipation(&self, d: Duration) {
        let mut st = lock(&self.st);
        st.anticipation = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.wake(st);
    }

    /// Closes the gate (its resource is gone): every wait ends with None, and every later one.
    pub fn close(&self) {
        let mut st = lock(&self.st);
        st.closed = true;
        self.wake(st);
    }

    /// Sets the resource's capacity (units per second, 0: none).
    pub fn set_capacity(&self, capacity: u64) {
        let mut st = lock(&self.st);
        st.sched.set_capacity(capacity);
        self.wake(st);
    }

    /// The resource's capacity.
    pub fn capacity(&self) -> u64 {
        lock(&self.st).sched.capacity()
    }

    /// Flow `id`'s counters.
    pub fn stats(&self, id: usize) -> Option<FlowStats> {
        lock(&self.st).sched.stats(id)
    }

    /// Waits until flow `id` may dispatch a request of `cost` units (its turn by the tags,
    /// the resource not full, fewer than `max_outstanding` out), at most `max_wait`: the
    /// grant, or None if the wait ran out (counted as a timeout), the flow was removed or the
    /// gate closed.
    pub fn acquire(&self, id: usize, cost: f64, max_wait: Duration) -> Option<Grant> {
        self.acquire_with(id, cost, max_wait, false)
    }

    /// As [`Gate::acquire`]; `then_more`: the flow will ask again right after this request, so
    /// it stays backlogged, its turn kept for it for the gate's anticipation (see the crate's
    /// documentation).
    pub fn acquire_with(
        &self,
        id: usize,
        cost: f64,
        max_wait: Duration,
        then_more: bool,
    ) -> Option<Grant> {
        self.acquire_then(id, cost, max_wait, then_more, &mut || {})
    }

    /// As [`Gate::acquire_with`]; `before_wait` is called (once, with no lock of the gate
    /// held) before the calling thread would first sleep: a caller that batches work for
    /// others (signals it has not sent yet) hands it over there, not on every request.
    pub fn acquire_then(
        &self,
        id: usize,
        cost: f64,
        max_wait: Duration,
        then_more: bool,
        before_wait: &mut dyn FnMut(),
    ) -> Option<Grant> {
        let mut before_wait = Some(before_wait);
        let mut st = lock(&self.st);
        if st.closed {
            return None;
        }
        let start = self.now();
        let deadline = start.saturating_add(u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX));
        st.unhold(id);
        st.sched.backlog(id, start);
        st.inside.push(id);
        let mut delayed = false;
        // A new flow waiting may change who goes next.
        if st.sleepers > 0 {
            self.cv.notify_all();
        }
        // The clock read once for a request that goes at once.
        let mut first = Some(start);
        loop {
            let now = first.take().unwrap_or_else(|| self.now());
            let mut until = deadline;
            if st.closed || st.sched.settings(id).is_none() {
                // Closed, or the flow removed meanwhile (not added back by a timeout's count).
                st.leave(id);
                st.sched.unbacklog(id);
                self.wake(st);
                return None;
            }
            if let Some(t) = st.expire_holds(now) {
                until = until.min(t);
            }
            if st.stalled_until.is_some_and(|t| now >= t) {
                st.stalled_until = None;
            }
            if let Some(t) = st.stalled_until {
                until = until.min(t);
            } else if st.outstanding < st.max_outstanding {
                match st.sched.pick(now) {
                    Pick::Go(f, phase) if f == id => {
                        let saved = st.sched.tags(id);
                        st.sched.charge(id, cost, now, phase);
                        st.leave(id);
                        if then_more && st.anticipation > 0 {
                            let t = now.saturating_add(st.anticipation);
                            st.held.push((id, t));
                        } else {
                            st.sched.unbacklog(id);
                        }
                        if delayed {
                            st.sched.flow(id).stats.delayed += 1;
                        }
                        st.outstanding += 1;
                        st.woken = None;
                        return Some(Grant {
                            id,
                            cost,
                            saved,
                            phase,
                            waited: delayed,
                        });
                    }
                    Pick::Wait(t) => until = until.min(t),
                    Pick::Go(other, _) if !st.inside.contains(&other) => {
                        // Its turn, its thread away but coming back (held): the hold's end is
                        // the latest the others wait (expire_holds gave it to `until`).
                    }
                    Pick::Go(other, _) => {
                        // Its turn may have come by the clock, with its thread asleep: wake it
                        // (once).
                        if st.woken != Some(other) {
                            st.woken = Some(other);
                            if st.sleepers > 0 {
                                self.cv.notify_all();
                            }
                        }
                    }
                    Pick::Idle => {}
                }
            }
            if now >= deadline {
                st.leave(id);
                st.sched.unbacklog(id);
                if let Some(f) = st.sched.flows.iter_mut().find(|f| f.id == id) {
                    f.stats.timeouts += 1;
                }
                self.wake(st);
                return None;
            }
            if let Some(f) = before_wait.take() {
                // Once, before the first sleep, with the gate unlocked (the caller's work may
                // take its own locks); then everything is looked at again.
                drop(st);
                f();
                st = lock(&self.st);
                continue;
            }
            delayed = true;
            let d = Duration::from_nanos(until.saturating_sub(now).max(1));
            st.sleepers += 1;
            st = self
                .cv
                .wait_timeout(st, d)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.sleepers -= 1;
        }
    }

    /// The granted request is done: the next may go.
    pub fn release(&self, g: Grant) {
        let _ = g.id;
        let mut st = lock(&self.st);
        st.outstanding = st.outstanding.saturating_sub(1);
        self.wake(st);
    }

    /// The resource could not take the granted request: its charge is undone (valid while
    /// nothing else was charged since, as with `max_outstanding` 1), and nothing is
    /// dispatched for `stall` or until [`Gate::kick`]. The flow stays backlogged (held, if it
    /// was) for its thread to ask again.
    pub fn refund(&self, g: Grant, stall: Duration) {
        let mut st = lock(&self.st);
        st.sched.restore(g.id, g.saved, g.cost);
        st.outstanding = st.outstanding.saturating_sub(1);
        let t = self
            .now()
            .saturating_add(u64::try_from(stall.as_nanos()).unwrap_or(u64::MAX));
        st.stalled_until = Some(t);
        self.wake(st);
    }

    /// The resource has room again (ends a stall).
    pub fn kick(&self) {
        let mut st = lock(&self.st);
        if st.stalled_until.take().is_some() {
            self.wake(st);
        }
    }

    /// Flow `id` will not ask again soon after all: its turn is not kept for it any more.
    pub fn unhold(&self, id: usize) {
        let mut st = lock(&self.st);
        if st.held.iter().any(|&(f, _)| f == id) {
            st.unhold(id);
            if !st.inside.contains(&id) {
                st.sched.unbacklog(id);
            }
            self.wake(st);
        }
    }

    /// Whether flow `id`'s limit lets a request go now (true without a limit or for an unknown
    /// flow).
    pub fn limit_ready(&self, id: usize) -> bool {
        let st = lock(&self.st);
        st.sched
            .flows
            .iter()
            .find(|f| f.id == id)
            .is_none_or(|f| f.set.limit == 0 || f.tags.l <= self.now() as f64)
    }

    /// Whether a flow other than `id` is waiting.
    pub fn others_waiting(&self, id: usize) -> bool {
        lock(&self.st)
            .sched
            .flows
            .iter()
            .any(|f| f.id != id && f.waiting)
    }
}

#[cfg(test)]
mod tests;
