//! The scheduler on a synthetic clock: a resource of fixed capacity, flows that always (or
//! sometimes) have a request, time advanced to whatever the scheduler says it waits for.

use super::*;

const SEC: u64 = 1_000_000_000;

fn set(shares: u32, reservation: u64, limit: u64) -> Settings {
    Settings {
        shares,
        reservation,
        limit,
    }
}

/// Runs `sched` from `now` for `secs` with the flows in `busy(now)` backlogged, each request
/// of `cost` units: units served per flow id (0..n).
fn run(
    sched: &mut Sched,
    n: usize,
    mut now: u64,
    secs: u64,
    cost: f64,
    busy: &dyn Fn(u64, usize) -> bool,
) -> (Vec<f64>, u64) {
    let end = now + secs * SEC;
    let mut got = vec![0.0; n];
    while now < end {
        for i in 0..n {
            if busy(now, i) {
                sched.backlog(i, now);
            } else {
                sched.unbacklog(i);
            }
        }
        match sched.pick(now) {
            Pick::Go(i, ph) => {
                sched.charge(i, cost, now, ph);
                // As under a Gate: the flow asks again for its next request.
                sched.unbacklog(i);
                got[i] += cost;
            }
            Pick::Wait(t) => now = t.max(now + 1),
            // Nothing wanted: the next microsecond may change that.
            Pick::Idle => now += 1000,
        }
    }
    (got, now)
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= want * tol
}

#[test]
fn three_flows_at_1_2_4_shares_divide_a_capacity_within_1_percent() {
    let mut s = Sched::new(7000, 4.0);
    for (i, w) in [1, 2, 4].into_iter().enumerate() {
        s.set(i, set(w, 0, 0));
    }
    let (got, _) = run(&mut s, 3, 1, 10, 1.0, &|_, _| true);
    for (i, w) in [1.0, 2.0, 4.0].into_iter().enumerate() {
        let want = 10.0 * 7000.0 * w / 7.0;
        assert!(within(got[i], want, 0.01), "flow {i}: {got:?} want {want}");
    }
    // Requests of different sizes: shares count units, not requests.
    let mut s = Sched::new(7_000_000, 65536.0);
    for (i, w) in [1, 2, 4].into_iter().enumerate() {
        s.set(i, set(w, 0, 0));
    }
    let mut now = 1;
    let mut got = [0.0; 3];
    let sizes = [1500.0, 64.0, 9000.0];
    while now < 10 * SEC {
        for i in 0..3 {
            s.backlog(i, now);
        }
        match s.pick(now) {
            Pick::Go(i, ph) => {
                s.charge(i, sizes[i], now, ph);
                got[i] += sizes[i];
            }
            Pick::Wait(t) => now = t,
            Pick::Idle => unreachable!(),
        }
    }
    let total: f64 = got.iter().sum();
    for (i, w) in [1.0, 2.0, 4.0].into_iter().enumerate() {
        assert!(within(got[i], total * w / 7.0, 0.01), "{got:?}");
    }
}

#[test]
fn a_reservation_is_met_and_the_rest_goes_by_shares() {
    // Flow 0: 1 share but 2000/s reserved; flows 1, 2: 100 shares each; capacity 10000/s.
    let mut s = Sched::new(10_000, 4.0);
    s.set(0, set(1, 2000, 0));
    s.set(1, set(100, 0, 0));
    s.set(2, set(100, 0, 0));
    let (got, _) = run(&mut s, 3, 1, 10, 1.0, &|_, _| true);
    assert!(got[0] >= 2000.0 * 10.0 * 0.99, "reservation met: {got:?}");
    assert!(within(got[0], 20_000.0, 0.01), "and not much more: {got:?}");
    assert!(
        within(got[1], 40_000.0, 0.01) && within(got[2], 40_000.0, 0.01),
        "{got:?}"
    );
    assert_eq!(s.stats(0).unwrap().reserved.round(), got[0].round());
    // A reservation below the flow's share does not add to it: max, not sum.
    let mut s = Sched::new(10_000, 4.0);
    s.set(0, set(100, 1000, 0));
    s.set(1, set(100, 0, 0));
    let (got, _) = run(&mut s, 2, 1, 10, 1.0, &|_, _| true);
    assert!(
        within(got[0], 50_000.0, 0.01) && within(got[1], 50_000.0, 0.01),
        "{got:?}"
    );
}

#[test]
fn reservation_limit_and_shares_together() {
    // 700/s: flow 0 has 1 share and 300 reserved, flow 1 2 shares, flow 2 4 shares but a
    // limit of 150: 300, 250, 150.
    let mut s = Sched::new(700, 4.0);
    s.set(0, set(1, 300, 0));
    s.set(1, set(2, 0, 0));
    s.set(2, set(4, 0, 150));
    let (got, _) = run(&mut s, 3, 1, 10, 1.0, &|_, _| true);
    for (i, want) in [3000.0, 2500.0, 1500.0].into_iter().enumerate() {
        assert!(within(got[i], want, 0.01), "flow {i}: {got:?}");
    }
}

#[test]
fn a_limit_is_never_exceeded_and_the_rest_goes_to_the_others() {
    let mut s = Sched::new(10_000, 4.0);
    s.set(0, set(4, 0, 1000));
    s.set(1, set(1, 0, 0));
    let mut now = 1;
    let mut served = 0.0;
    // Checked over every prefix: at most burst + limit x elapsed.
    let start = now;
    let mut other = 0.0;
    while now < 10 * SEC {
        s.backlog(0, now);
        s.backlog(1, now);
        match s.pick(now) {
            Pick::Go(i, ph) => {
                s.charge(i, 1.0, now, ph);
                if i == 0 {
                    served += 1.0;
                    let allowed = 4.0 + 1.0 + 1000.0 * (now - start) as f64 / 1e9;
                    assert!(served <= allowed, "{served} > {allowed} at {now}");
                } else {
                    other += 1.0;
                }
            }
            Pick::Wait(t) => now = t,
            Pick::Idle => unreachable!(),
        }
    }
    assert!(
        within(served, 10_000.0, 0.01),
        "limited flow got its limit: {served}"
    );
    assert!(within(other, 90_000.0, 0.01), "the other the rest: {other}");
    // Alone and uncontended (no capacity), a flow is slowed by its own limit only.
    let mut s = Sched::new(0, 0.0);
    s.set(0, set(1, 0, 500));
    let (got, _) = run(&mut s, 1, 1, 4, 1.0, &|_, _| true);
    assert!(within(got[0], 2000.0, 0.01), "{got:?}");
    let mut s = Sched::new(0, 0.0);
    s.set(0, set(1, 0, 0));
    assert_eq!(s.pick(5), Pick::Idle);
    s.backlog(0, 5);
    assert_eq!(s.pick(5), Pick::Go(0, Phase::Shares), "no limit: no wait");
}

#[test]
fn idle_flows_bank_no_more_than_the_burst() {
    // Flow 0 idles for 5 s while flow 1 runs alone, then both run: in the next second flow 0
    // gets its share plus at most the burst.
    let burst = 50.0;
    let mut s = Sched::new(1000, burst);
    s.set(0, set(1, 0, 0));
    s.set(1, set(1, 0, 0));
    let (_, now) = run(&mut s, 2, 1, 5, 1.0, &|_, i| i == 1);
    let (got, _) = run(&mut s, 2, now, 1, 1.0, &|_, _| true);
    assert!(got[0] <= 500.0 + burst + 1.0, "{got:?}");
    assert!(got[0] >= 500.0 - 1.0, "{got:?}");
    // The same for a reservation and a limit: no catching up on what was not asked for.
    let mut s = Sched::new(1000, burst);
    s.set(0, set(1, 300, 400));
    s.set(1, set(1, 0, 0));
    let (_, now) = run(&mut s, 2, 1, 5, 1.0, &|_, i| i == 1);
    let (got, _) = run(&mut s, 2, now, 1, 1.0, &|_, _| true);
    assert!(got[0] <= 400.0 + burst + 1.0, "limit and burst: {got:?}");
    assert!(got[0] >= 400.0 - 1.0, "{got:?}");
}

#[test]
fn settings_are_checked() {
    assert!(set(0, 0, 0).check().is_err());
    assert!(set(1, 10, 5).check().is_err());
    assert!(set(1, 10, 0).check().is_ok());
    assert!(set(MAX_SHARES + 1, 0, 0).check().is_err());
}

#[test]
fn the_gate_lets_one_thread_per_flow_through_in_share_order() {
    // Real threads, real clock: three flows at 1:2:4 on a gate of capacity 20000 units/s,
    // each thread asking flat out. Loose bounds: the host is shared.
    let g = std::sync::Arc::new(Gate::new(20_000, 1, 8.0));
    for (i, w) in [1, 2, 4].into_iter().enumerate() {
        g.set(i, set(w, 0, 0));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ts: Vec<_> = (0..3)
        .map(|i| {
            let (g, stop) = (g.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(gr) = g.acquire(i, 1.0, Duration::from_secs(5)) {
                        g.release(gr);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    while g.stats(0).map_or(0.0, |s| s.served) < 2000.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "progress");
        std::thread::yield_now();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in ts {
        t.join().unwrap();
    }
    let got: Vec<f64> = (0..3).map(|i| g.stats(i).unwrap().served).collect();
    let total: f64 = got.iter().sum();
    for (i, w) in [1.0, 2.0, 4.0].into_iter().enumerate() {
        assert!(within(got[i], total * w / 7.0, 0.1), "{got:?}");
    }
}

#[test]
fn the_gate_keeps_the_capacity_busy_with_a_reservation_and_a_limit() {
    // 2000/s: flow 0 (1 share, 600 reserved), flow 1 (2 shares), flow 2 (4 shares, limit
    // 300): 600, 1100, 300 — and the capacity used, no thread left asleep on its turn.
    let g = std::sync::Arc::new(Gate::new(2000, 1, 8.0));
    g.set(0, set(1, 600, 0));
    g.set(1, set(2, 0, 0));
    g.set(2, set(4, 0, 300));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ts: Vec<_> = (0..3)
        .map(|i| {
            let (g, stop) = (g.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(gr) = g.acquire(i, 1.0, Duration::from_secs(5)) {
                        g.release(gr);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        std::thread::park_timeout(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in ts {
        t.join().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let got: Vec<f64> = (0..3).map(|i| g.stats(i).unwrap().served / secs).collect();
    for (i, want) in [600.0, 1100.0, 300.0].into_iter().enumerate() {
        assert!(within(got[i], want, 0.1), "flow {i}: {got:?} per second");
    }
}

/// Three threads at 1:2:4 that are away between two requests (a sleep of ~0.2 ms, longer than
/// the 0.1 ms a request takes of the capacity): their flows would not be backlogged when most
/// turns come. Told they have more, the gate keeps their turns (anticipation 5 ms, far above
/// the gap even on a loaded host) and the capacity is divided 1:2:4; without it, the shares
/// flatten towards equal (the measure below: the 4-share flow gets less than twice the 1-share
/// one's).
fn gapped_1_2_4(anticipate: bool) -> Vec<f64> {
    let g = std::sync::Arc::new(Gate::new(10_000, 1, 8.0));
    if anticipate {
        g.set_anticipation(Duration::from_millis(5));
    }
    for (i, w) in [1, 2, 4].into_iter().enumerate() {
        g.set(i, set(w, 0, 0));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ts: Vec<_> = (0..3)
        .map(|i| {
            let (g, stop) = (g.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(gr) = g.acquire_with(i, 1.0, Duration::from_secs(5), true) {
                        g.release(gr);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                g.unhold(i);
            })
        })
        .collect();
    let t = Instant::now();
    while g.stats(0).map_or(0.0, |s| s.served) < 300.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "progress");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in ts {
        t.join().unwrap();
    }
    (0..3).map(|i| g.stats(i).unwrap().served).collect()
}

#[test]
fn a_flow_between_two_requests_keeps_its_turn_when_it_has_more() {
    let got = gapped_1_2_4(true);
    let total: f64 = got.iter().sum();
    for (i, w) in [1.0, 2.0, 4.0].into_iter().enumerate() {
        assert!(within(got[i], total * w / 7.0, 0.1), "{got:?}");
    }
    let flat = gapped_1_2_4(false);
    assert!(flat[2] < 2.0 * flat[0], "without anticipation: {flat:?}");
}

#[test]
fn removing_a_flow_or_closing_the_gate_ends_its_waits() {
    let g = std::sync::Arc::new(Gate::new(1, 1, 0.0));
    g.set(0, set(1, 0, 0));
    g.set(1, set(1, 0, 0));
    // Capacity 1 unit/s: the first request goes, the next ones wait ~1 s each.
    let first = g.acquire(0, 1.0, Duration::from_secs(1)).expect("at once");
    g.release(first);
    let t = Instant::now();
    let (g1, g2) = (g.clone(), g.clone());
    let a = std::thread::spawn(move || g1.acquire(0, 1.0, Duration::from_secs(30)).is_none());
    let b = std::thread::spawn(move || g2.acquire(1, 1.0, Duration::from_secs(30)).is_none());
    while !(g.others_waiting(1) && g.others_waiting(0)) {
        std::thread::yield_now();
    }
    g.remove(0);
    assert!(a.join().unwrap(), "a removed flow's wait ends with None");
    g.close();
    assert!(b.join().unwrap(), "a closed gate's waits end with None");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        g.acquire(1, 1.0, Duration::from_secs(1)).is_none(),
        "closed"
    );
}

#[test]
fn before_wait_is_called_once_before_a_sleep_and_never_for_a_request_that_goes_at_once() {
    let g = std::sync::Arc::new(Gate::new(0, 1, 8.0));
    g.set(0, set(1, 0, 0));
    g.set(1, set(1, 0, 0));
    let mut called = 0;
    let first = g
        .acquire_then(0, 1.0, Duration::from_secs(5), false, &mut || called += 1)
        .expect("an idle gate lets it go");
    assert_eq!(
        called, 0,
        "nothing to hand over for a request that goes at once"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let g2 = g.clone();
    let t = std::thread::spawn(move || {
        let mut n = 0;
        let gr = g2.acquire_then(1, 1.0, Duration::from_secs(5), false, &mut || {
            n += 1;
            tx.send(()).unwrap();
        });
        (gr.map(|gr| g2.release(gr)).is_some(), n)
    });
    // The second request has nowhere to go (one out at most) until the first is released:
    // its thread hands over its work before it sleeps.
    rx.recv().unwrap();
    g.release(first);
    let (granted, n) = t.join().unwrap();
    assert!(
        granted,
        "the second request goes once the first is released"
    );
    assert_eq!(n, 1, "called once, however often the thread sleeps");
}
