//! A DSM node process for the multi-process tests and the benchmark: binds, prints its
//! address, reads every node's address on stdin, joins, then runs workload commands read
//! from stdin one line at a time, answering each with one line on stdout.
//!
//! `wv-dsm-node --id I --nodes N --bytes B [--backing anon|shared] [--hold-us U]
//! [--versions on|off] [--read-ahead PAGES] [--peer-timeout-ms MS] [--listen ADDR]
//! [--mirror-ms MS]` (ADDR defaults to 127.0.0.1:0; `--mirror-ms`: mirroring on, pushing every
//! MS milliseconds); commands:
//! `counter THREADS ITERS` (once per cluster), `read PAGE...`, `ring STEPS BASE PAGES`, `fill BASE PAGES SEED`,
//! `sum BASE PAGES`, `part BASE PAGES ROUNDS`, `lat-read BASE PAGES`, `lat-write BASE PAGES`,
//! `tput BASE PAGES OPS`, `scan BASE PAGES`, `local-floor PAGES`, `stats`, `errors`,
//! `wait-error MS`, `failed` (the error that failed the node, or `none`), `bg-read PAGE` (a thread reads the page; `bg-status` says whether it is
//! done), `exit`.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use wv_dsm::{Backing, Config, Listener, Node, PageOps, Region};

const PAGE: usize = 4096;
/// Page 0 holds the spinlock; pages 1..=COUNTERS the counters.
const COUNTERS: usize = 3;
/// The counter workload's start barrier.
const BARRIER: usize = 4;

struct Mem {
    base: *mut u8,
    len: usize,
}

// SAFETY: the pointer is to the node's region, which outlives every workload thread (they are
// joined before the command returns), and all access through it is atomic.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn word(&self, page: usize, word: usize) -> &AtomicU64 {
        let off = page * PAGE + word * 8;
        assert!(off + 8 <= self.len, "offset {off} outside the region");
        // SAFETY: in bounds (checked), 8-byte aligned (the region is page-aligned), and the
        // region lives as long as `self`; every access to it is atomic.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("wv-dsm-node: {msg}");
    std::process::exit(1)
}

fn num<T: std::str::FromStr>(s: Option<&str>, what: &str) -> T {
    s.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail(&format!("bad or missing {what}")))
}

fn spin(i: &mut u32) {
    *i += 1;
    if i.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Byte `j` of page `p` in the pattern with `seed`.
fn pattern(seed: u64, p: u64, j: u64) -> u8 {
    let x = (seed ^ (p << 20) ^ j).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn percentiles(mut v: Vec<u64>) -> String {
    v.sort_unstable();
    if v.is_empty() {
        return "0 0".into();
    }
    let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)];
    format!("{} {}", v[v.len() / 2], p99)
}

fn local_floor(pages: usize) -> String {
    let region =
        Region::map(pages * PAGE, Backing::Anonymous).unwrap_or_else(|e| fail(&e.to_string()));
    let mut uffd =
        wv_dsm::uffd::UffdMem::register(&region).unwrap_or_else(|e| fail(&e.to_string()));
    let base = region.as_ptr() as usize;
    let handler = std::thread::spawn(move || {
        let zero = vec![0u8; PAGE];
        let mut served = 0;
        let mut faults = Vec::new();
        while served < pages {
            let mut pfd = libc::pollfd {
                fd: uffd.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            faults.clear();
            while uffd.read_faults(&mut faults).unwrap_or(false) {}
            for f in &faults {
                uffd.install(f.page, &zero, false)
                    .unwrap_or_else(|e| fail(&e.to_string()));
                served += 1;
            }
            uffd.flush_wakes().unwrap_or_else(|e| fail(&e.to_string()));
        }
    });
    let mut lat = Vec::with_capacity(pages);
    for p in 0..pages {
        let t = Instant::now();
        // SAFETY: in the region, which lives until the end of this function.
        unsafe { std::ptr::write_volatile((base + p * PAGE) as *mut u8, 1) };
        lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let _ = handler.join();
    format!("lat {}", percentiles(lat))
}

/// The value the `bg-read` thread read (u64::MAX while it has not finished).
static BG: AtomicU64 = AtomicU64::new(u64::MAX);

fn run(node: &Node, mem: &'static Mem, id: u64, nodes: u64, line: &str) -> String {
    let mut w = line.split_whitespace();
    let cmd = w.next().unwrap_or("");
    let mut arg = |what: &str| -> usize { num(w.next(), what) };
    match cmd {
        "counter" => {
            let (threads, iters) = (arg("threads"), arg("iterations"));
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        // Start together: every thread of every node arrives at a barrier
                        // in shared memory (page BARRIER) first.
                        let arrived = mem.word(BARRIER, 0);
                        arrived.fetch_add(1, Ordering::AcqRel);
                        let mut i = 0;
                        while arrived.load(Ordering::Acquire) < nodes * threads as u64 {
                            spin(&mut i);
                        }
                        let lock = mem.word(0, 0);
                        for _ in 0..iters {
                            let mut i = 0;
                            while lock.load(Ordering::Relaxed) != 0
                                || lock
                                    .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                                    .is_err()
                            {
                                spin(&mut i);
                            }
                            for c in 1..=COUNTERS {
                                let w = mem.word(c, 0);
                                w.store(w.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                            }
                            lock.store(0, Ordering::Release);
                            // Some private work between critical sections, so that the
                            // nodes' iterations interleave.
                            for _ in 0..500 {
                                std::hint::spin_loop();
                            }
                        }
                    });
                }
            });
            "ok".into()
        }
        "read" => {
            let v: Vec<String> = w
                .map(|p| {
                    mem.word(num(Some(p), "page"), 0)
                        .load(Ordering::Acquire)
                        .to_string()
                })
                .collect();
            format!("values {}", v.join(" "))
        }
        "ring" => {
            let (steps, base, pages) =
                (arg("steps") as u64, arg("base"), arg("pages").max(1) as u64);
            let slot = |t: u64| base + usize::try_from(t % pages).unwrap_or(0);
            let mut done = 0;
            let mut t = id;
            while t < steps {
                let here = mem.word(slot(t), 0);
                let mut i = 0;
                while here.load(Ordering::Acquire) != t {
                    spin(&mut i);
                }
                mem.word(slot(t + 1), 0).store(t + 1, Ordering::Release);
                done += 1;
                t += nodes;
            }
            format!("steps {done}")
        }
        "fill" => {
            let (base, pages, seed) = (arg("base"), arg("pages"), arg("seed") as u64);
            for p in base..base + pages {
                for k in 0..PAGE / 8 {
                    let mut b = [0u8; 8];
                    for (j, x) in b.iter_mut().enumerate() {
                        *x = pattern(seed, p as u64, (k * 8 + j) as u64);
                    }
                    mem.word(p, k)
                        .store(u64::from_le_bytes(b), Ordering::Relaxed);
                }
            }
            "ok".into()
        }
        "sum" => {
            let (base, pages) = (arg("base"), arg("pages"));
            let bytes = (base..base + pages)
                .flat_map(|p| (0..PAGE / 8).map(move |k| (p, k)))
                .flat_map(|(p, k)| mem.word(p, k).load(Ordering::Relaxed).to_le_bytes());
            format!("sum {:016x}", fnv(bytes))
        }
        "part" => {
            let (base, pages, rounds) = (arg("base"), arg("pages"), arg("rounds"));
            for _ in 0..rounds {
                for p in base..base + pages {
                    mem.word(p, 1).fetch_add(1, Ordering::Relaxed);
                }
            }
            "ok".into()
        }
        "lat-read" | "lat-write" => {
            let (base, pages) = (arg("base"), arg("pages"));
            let mut lat = Vec::with_capacity(pages);
            for p in base..base + pages {
                let w = mem.word(p, 0);
                let t = Instant::now();
                if cmd == "lat-read" {
                    std::hint::black_box(w.load(Ordering::Relaxed));
                } else {
                    w.store(7, Ordering::Relaxed);
                }
                lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            format!("lat {}", percentiles(lat))
        }
        "tput" => {
            let (base, pages, ops) = (arg("base"), arg("pages").max(1), arg("ops"));
            let t = Instant::now();
            for i in 0..ops {
                mem.word(base + i % pages, 0)
                    .fetch_add(1, Ordering::Relaxed);
            }
            format!("tput {:.0}", ops as f64 / t.elapsed().as_secs_f64())
        }
        "scan" => {
            let (base, pages) = (arg("base"), arg("pages"));
            let mut sum = 0u64;
            for p in base..base + pages {
                sum = sum.wrapping_add(mem.word(p, 0).load(Ordering::Relaxed));
            }
            format!("scan {sum}")
        }
        "wait-error" => {
            let ms = arg("milliseconds") as u64;
            match node.wait_error(std::time::Duration::from_millis(ms)) {
                Some(e) => format!("error {e}"),
                None => "none".into(),
            }
        }
        "bg-read" => {
            let page = arg("page");
            std::thread::spawn(move || {
                BG.store(mem.word(page, 0).load(Ordering::Acquire), Ordering::Release);
            });
            "started".into()
        }
        "bg-status" => match BG.load(Ordering::Acquire) {
            u64::MAX => "blocked".into(),
            v => format!("done {v}"),
        },
        "local-floor" => local_floor(arg("pages")),
        "stats" => format!("stats {}", node.stats()),
        "failed" => match node.failed() {
            Some(e) => format!("failed {e}"),
            None => "none".into(),
        },
        "errors" => {
            let e: Vec<String> = node.errors().iter().map(ToString::to_string).collect();
            format!("errors {}", e.join("; "))
        }
        _ => fail(&format!("unknown command {line:?}")),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut id, mut nodes, mut bytes, mut backing, mut hold) =
        (0u32, 1u32, 1usize << 20, Backing::Anonymous, None);
    let mut versioning = true;
    let mut read_ahead = 0u32;
    let mut peer_timeout = None;
    let mut listen = String::from("127.0.0.1:0");
    let mut mirror = None;
    while let Some(a) = args.next() {
        let v = args.next();
        match a.as_str() {
            "--id" => id = num(v.as_deref(), "--id"),
            "--nodes" => nodes = num(v.as_deref(), "--nodes"),
            "--bytes" => bytes = num(v.as_deref(), "--bytes"),
            "--versions" => versioning = v.as_deref() != Some("off"),
            "--listen" => {
                listen = v.unwrap_or_else(|| fail("bad or missing --listen"));
            }
            "--read-ahead" => read_ahead = num(v.as_deref(), "--read-ahead"),
            "--peer-timeout-ms" => {
                peer_timeout = Some(std::time::Duration::from_millis(num(
                    v.as_deref(),
                    "--peer-timeout-ms",
                )))
            }
            "--mirror-ms" => {
                mirror = Some(std::time::Duration::from_millis(num(
                    v.as_deref(),
                    "--mirror-ms",
                )))
            }
            "--hold-us" => {
                hold = Some(std::time::Duration::from_micros(num(
                    v.as_deref(),
                    "--hold-us",
                )))
            }
            "--backing" => {
                backing = match v.as_deref() {
                    Some("anon") => Backing::Anonymous,
                    Some("shared") => Backing::Shared,
                    _ => fail("--backing is anon or shared"),
                }
            }
            _ => fail(&format!("unknown option {a}")),
        }
    }
    let mut out = std::io::stdout().lock();
    let mut say = |s: &str| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    let listener =
        Listener::bind(listen.as_str()).unwrap_or_else(|e| fail(&format!("bind {listen}: {e}")));
    say(&format!(
        "addr {}",
        listener
            .local_addr()
            .unwrap_or_else(|e| fail(&e.to_string()))
    ));
    let mut lines = std::io::stdin().lock().lines();
    let mut next = || {
        lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| "exit".into())
    };
    let peers_line = next();
    let peers: Vec<_> = peers_line
        .strip_prefix("peers ")
        .unwrap_or_else(|| fail("expected `peers ADDR...`"))
        .split_whitespace()
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| fail(&format!("bad address {a}")))
        })
        .collect();
    if peers.len() != nodes as usize {
        fail("peer count differs from --nodes");
    }
    let mut cfg = Config::new(id, peers);
    if let Some(h) = hold {
        cfg.hold = h;
    }
    cfg = cfg.with_versioning(versioning).with_read_ahead(read_ahead);
    if let Some(t) = peer_timeout {
        cfg = cfg.with_peer_timeout(t);
    }
    if let Some(t) = mirror {
        cfg = cfg.with_mirror(true).with_mirror_interval(t);
    }
    let region =
        Region::map(bytes, backing).unwrap_or_else(|e| fail(&format!("mapping the region: {e}")));
    let node = Node::join(listener, cfg, region)
        .unwrap_or_else(|e| fail(&format!("node {id}: joining: {e}")));
    // Leaked: the `bg-read` thread may outlive every command (it stays blocked on a page of
    // a failed node until the process exits).
    let mem: &'static Mem = Box::leak(Box::new(Mem {
        base: node.region().as_ptr(),
        len: node.region().len(),
    }));
    say("ready");
    loop {
        let line = next();
        if line.trim() == "exit" {
            say("bye");
            // Leave without tearing the node down: peers may still be shutting down too.
            std::process::exit(0);
        }
        let r = run(&node, mem, u64::from(id), u64::from(nodes), &line);
        say(&r);
    }
}
