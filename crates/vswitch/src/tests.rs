//! Unit tests of the switch on raw rings: guests are plain memory with hand-written
//! descriptor tables, and some of what they post is hostile.

use super::*;
use vm_memory::{Address, Bytes, GuestAddress};

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const QSIZE: u16 = 16;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

/// A guest: its memory and one queue (receive or transmit) at the fixed layout.
struct Guest {
    mem: GuestMemoryMmap,
    vring: VringRwLock<Mem>,
    avail: u16,
}

impl Guest {
    fn new() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Guest {
            mem,
            vring,
            avail: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Makes the chain at `head` available.
    fn offer(&mut self, head: u16) {
        let slot = u64::from(self.avail % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Used entries so far: (head, length).
    fn used(&self) -> Vec<(u32, u32)> {
        let n: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..u64::from(n))
            .map(|i| {
                let at = GuestAddress(USED + 4 + 8 * (i % u64::from(QSIZE)));
                (
                    self.mem.read_obj(at).unwrap(),
                    self.mem.read_obj(at.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }

    fn atomic(&self) -> Mem {
        GuestMemoryAtomic::new(self.mem.clone())
    }
}

/// A switch with VM ports a and b on network n1 and c on n2.
fn switch() -> Arc<Switch> {
    Switch::new(&Config {
        socket_dir: PathBuf::from("/nonexistent"),
        networks: vec![
            NetworkConfig {
                name: "n1".into(),
                ports: vec!["a".into(), "b".into()],
                uplink: None,
            },
            NetworkConfig {
                name: "n2".into(),
                ports: vec!["c".into()],
                uplink: None,
            },
        ],
    })
    .unwrap()
}

/// Connects `port`'s receive side to guest `g` (as a frontend's set-up does).
fn connect_rx(sw: &Switch, port: usize, g: &Guest, mergeable: bool) {
    let p = sw.read().port(port).unwrap().clone();
    let mut rx = lock(&p.rx);
    rx.mem = Some(g.atomic());
    rx.vring = Some(g.vring.clone());
    rx.mergeable = mergeable;
}

fn counters(sw: &Switch, port: usize) -> PortStats {
    sw.stats()[port].clone()
}

/// A frame from `src` to `dst` with a vnet header whose flags are garbage (the switch writes
/// its own), `len` bytes in all.
fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    f[..VNET_HDR].fill(0xee);
    f[VNET_HDR..VNET_HDR + 6].copy_from_slice(&dst);
    f[VNET_HDR + 6..VNET_HDR + 12].copy_from_slice(&src);
    f
}

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

/// Guest a transmits `f` as one descriptor at 0x8000 through port 0.
fn send(sw: &Arc<Switch>, tx: &mut Guest, f: &[u8]) {
    tx.mem.write_slice(f, GuestAddress(0x8000)).unwrap();
    tx.desc(0, 0x8000, f.len() as u32, 0, 0);
    tx.offer(0);
    transmit(sw, 0, tx);
}

fn transmit(sw: &Arc<Switch>, port: usize, tx: &Guest) {
    let b = PortBackend::new(sw.clone(), port).unwrap();
    b.rx().mem = Some(tx.atomic());
    b.transmit(&tx.vring);
}

#[test]
fn a_frame_is_copied_once_into_the_buffer_the_receiver_posted() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    // Two buffers for b, each split over two descriptors.
    rx.desc(0, 0x10000, 20, WRITE | NEXT, 1);
    rx.desc(1, 0x20000, 2000, WRITE, 0);
    rx.offer(0);
    let f = frame(MAC_B, MAC_A, 300);
    send(&sw, &mut tx, &f);
    assert_eq!(rx.used(), vec![(0, 300)]);
    let mut got = vec![0u8; 300];
    rx.mem
        .read_slice(&mut got[..20], GuestAddress(0x10000))
        .unwrap();
    rx.mem
        .read_slice(&mut got[20..], GuestAddress(0x20000))
        .unwrap();
    // The switch's own header (no offloads, one buffer), then the frame byte for byte.
    assert_eq!(&got[..VNET_HDR], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(&got[VNET_HDR..], &f[VNET_HDR..]);
    assert_eq!(tx.used(), vec![(0, 0)], "the transmit chain is returned");
    let (a, b) = (counters(&sw, 0), counters(&sw, 1));
    assert_eq!((a.tx_frames, a.tx_bytes), (1, 288));
    assert_eq!(
        (b.rx_frames, b.rx_bytes, b.copies, b.copied_bytes),
        (1, 288, 1, 288)
    );
    // a was learned: a frame from b to a goes to a only (c, on another network, never).
    let t = sw.read();
    let macs = lock(&t.network(0).unwrap().macs);
    assert_eq!(macs.get(&MAC_A).map(|e| e.0), Some(0));
}

#[test]
fn mergeable_buffers_take_a_frame_across_chains() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, true);
    for i in 0..3u16 {
        rx.desc(i, 0x10000 + 0x1000 * u64::from(i), 1000, WRITE, 0);
        rx.offer(i);
    }
    let f = frame(MAC_B, MAC_A, 2500);
    send(&sw, &mut tx, &f);
    assert_eq!(rx.used(), vec![(0, 1000), (1, 1000), (2, 500)]);
    let nb: u16 = rx.mem.read_obj(GuestAddress(0x10000 + 10)).unwrap();
    assert_eq!(nb, 3, "num_buffers");
    let mut tail = [0u8; 500];
    rx.mem.read_slice(&mut tail, GuestAddress(0x12000)).unwrap();
    assert_eq!(&tail[..], &f[2000..]);
}

#[test]
fn hostile_transmit_chains_are_dropped_and_counted() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    for i in 0..QSIZE {
        rx.desc(i, 0x10000 + 0x1000 * u64::from(i), 2048, WRITE, 0);
        rx.offer(i);
    }
    let f = frame(MAC_B, MAC_A, 100);
    tx.mem.write_slice(&f, GuestAddress(0x8000)).unwrap();
    type Make = Box<dyn Fn(&Guest)>;
    let cases: Vec<(&str, Make)> = vec![
        (
            "device-writable",
            Box::new(|g| g.desc(0, 0x8000, 100, WRITE, 0)),
        ),
        (
            "outside memory",
            Box::new(|g| g.desc(0, (1 << 20) - 50, 100, 0, 0)),
        ),
        (
            "huge length",
            Box::new(|g| g.desc(0, 0x8000, u32::MAX, 0, 0)),
        ),
        ("too short", Box::new(|g| g.desc(0, 0x8000, 20, 0, 0))),
        (
            "a loop",
            Box::new(|g| {
                g.desc(0, 0x8000, 10, NEXT, 1);
                g.desc(1, 0x8000, 10, NEXT, 0);
            }),
        ),
        (
            "next out of the table",
            Box::new(|g| g.desc(0, 0x8000, 100, NEXT, 999)),
        ),
        (
            "larger than a frame in pieces",
            Box::new(|g| {
                for i in 0..QSIZE {
                    let next = if i + 1 < QSIZE { NEXT } else { 0 };
                    g.desc(i, 0x8000, 60_000, next, i + 1);
                }
            }),
        ),
    ];
    for (n, (what, make)) in cases.iter().enumerate() {
        make(&tx);
        tx.offer(0);
        transmit(&sw, 0, &tx);
        assert_eq!(
            counters(&sw, 0).dropped_malformed,
            n as u64 + 1,
            "{what}: not dropped"
        );
        assert_eq!(tx.used().len(), n + 1, "{what}: the chain is returned");
    }
    assert_eq!(counters(&sw, 1).rx_frames, 0, "nothing was delivered");
    // The port still works afterwards.
    tx.desc(0, 0x8000, 100, 0, 0);
    tx.offer(0);
    transmit(&sw, 0, &tx);
    assert_eq!(counters(&sw, 1).rx_frames, 1);
}

#[test]
fn hostile_receive_buffers_are_returned_empty() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    // Readable, outside memory, too small for the frame, too small for a header.
    rx.desc(0, 0x10000, 2048, 0, 0);
    rx.desc(1, (1 << 20) - 10, 2048, WRITE, 0);
    rx.desc(2, 0x12000, 50, WRITE, 0);
    rx.desc(3, 0x13000, 4, WRITE, 0);
    for i in 0..4 {
        rx.offer(i);
    }
    for _ in 0..4 {
        send(&sw, &mut tx, &frame(MAC_B, MAC_A, 100));
    }
    assert_eq!(rx.used(), vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
    let b = counters(&sw, 1);
    assert_eq!((b.rx_frames, b.dropped_malformed), (0, 4));
    let mut untouched = [0u8; 50];
    rx.mem
        .read_slice(&mut untouched, GuestAddress(0x12000))
        .unwrap();
    assert_eq!(untouched, [0; 50]);
}

#[test]
fn frames_wait_in_bounded_slots_until_buffers_come() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    for i in 0..PENDING_SLOTS + 3 {
        let mut f = frame(MAC_B, MAC_A, 80);
        f[VNET_HDR + 14] = i as u8;
        send(&sw, &mut tx, &f);
    }
    let b = counters(&sw, 1);
    assert_eq!(b.queued, PENDING_SLOTS as u64);
    assert_eq!(
        b.dropped_no_buffer, 3,
        "beyond the slots, frames are dropped"
    );
    assert_eq!(b.rx_frames, 0);
    // The guest posts two buffers and kicks: the oldest two frames arrive, in order.
    rx.desc(0, 0x10000, 2048, WRITE, 0);
    rx.desc(1, 0x11000, 2048, WRITE, 0);
    rx.offer(0);
    rx.offer(1);
    Switch::flush(&sw.read().port(1).unwrap().clone());
    assert_eq!(rx.used(), vec![(0, 80), (1, 80)]);
    for (i, at) in [0x10000u64, 0x11000].iter().enumerate() {
        let tag: u8 = rx
            .mem
            .read_obj(GuestAddress(at + (VNET_HDR + 14) as u64))
            .unwrap();
        assert_eq!(tag, i as u8);
    }
    assert_eq!(counters(&sw, 1).rx_frames, 2);
    // A frame sent now waits behind the held ones rather than overtaking them.
    rx.desc(2, 0x12000, 2048, WRITE, 0);
    rx.offer(2);
    send(&sw, &mut tx, &frame(MAC_B, MAC_A, 80));
    assert_eq!(rx.used().len(), 3);
    let tag: u8 = rx
        .mem
        .read_obj(GuestAddress(0x12000 + (VNET_HDR + 14) as u64))
        .unwrap();
    assert_eq!(tag, 2, "order kept");
}

#[test]
fn networks_are_isolated_and_crossing_frames_counted() {
    let sw = switch();
    let (mut ta, mut tc) = (Guest::new(), Guest::new());
    let (rb, rc) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rb, false);
    connect_rx(&sw, 2, &rc, false);
    // a broadcasts (learned on n1): b may get it, c never does.
    send(&sw, &mut ta, &frame([0xff; 6], MAC_A, 60));
    assert_eq!(counters(&sw, 2).rx_frames + counters(&sw, 2).queued, 0);
    assert_eq!(counters(&sw, 1).queued, 1);
    // c, on n2, sends to a's MAC: dropped and counted at c's port.
    let f = frame(MAC_A, [0x52, 0x54, 0, 0, 0, 0xc], 60);
    tc.mem.write_slice(&f, GuestAddress(0x8000)).unwrap();
    tc.desc(0, 0x8000, 60, 0, 0);
    tc.offer(0);
    transmit(&sw, 2, &tc);
    let c = counters(&sw, 2);
    assert_eq!((c.tx_frames, c.dropped_isolated), (1, 1));
    assert_eq!(counters(&sw, 0).queued + counters(&sw, 0).rx_frames, 0);
    assert_eq!(counters(&sw, 0).dropped_no_buffer, 0, "not even tried");
}

#[test]
fn a_port_without_a_guest_drops_what_comes_for_it() {
    let sw = switch();
    let mut tx = Guest::new();
    send(&sw, &mut tx, &frame(MAC_B, MAC_A, 60));
    let b = counters(&sw, 1);
    assert!(!b.connected);
    assert_eq!((b.rx_frames, b.dropped_no_buffer), (0, 1));
}

#[test]
fn names_are_checked() {
    for ok in ["lan", "a-b_c.1", "x"] {
        assert!(valid_name(ok), "{ok}");
    }
    for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
        assert!(!valid_name(bad), "{bad}");
    }
    let dup = Config {
        socket_dir: PathBuf::new(),
        networks: vec![NetworkConfig {
            name: "n".into(),
            ports: vec!["p".into(), "p".into()],
            uplink: None,
        }],
    };
    assert!(Switch::new(&dup).is_err());
}

#[test]
fn a_memory_table_beyond_its_file_is_refused() {
    use std::os::fd::FromRawFd;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    // SAFETY: memfd_create reads a NUL-terminated name; the descriptor is new.
    let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nothing else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(4096).unwrap();
    // A frontend's region of 1 MiB over a 4 KiB file: touching its end would raise SIGBUS.
    let region = |len: usize| {
        let m = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_file_offset(FileOffset::new(f.try_clone().unwrap(), 0))
            .build()
            .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(m, GuestAddress(0)).unwrap()])
            .unwrap()
    };
    let b = PortBackend::new(switch(), 0).unwrap();
    let e = b
        .update_memory(GuestMemoryAtomic::new(region(1 << 20)))
        .unwrap_err();
    assert!(e.to_string().contains("4096-byte file"), "{e}");
    assert!(b.rx().mem.is_none(), "the table was not taken");
    b.update_memory(GuestMemoryAtomic::new(region(4096)))
        .unwrap();
    assert!(b.rx().mem.is_some());
}

/// Bulk integrity: frames of many sizes, sent from transmit chains of several segments, arrive
/// in the receiver's mergeable buffers byte for byte, each copied once.
#[test]
fn every_byte_of_every_frame_arrives() {
    let sw = switch();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut sent_bytes, rounds) = (0u64, 300);
    for round in 0..rounds {
        let (mut tx, mut rx) = (Guest::new(), Guest::new());
        connect_rx(&sw, 1, &rx, true);
        for i in 0..QSIZE {
            rx.desc(i, 0x10000 + 0x1000 * u64::from(i), 4096, WRITE, 0);
            rx.offer(i);
        }
        let len = VNET_HDR + 14 + rand(60_000) as usize;
        let mut f = frame(MAC_B, MAC_A, len);
        for b in &mut f[VNET_HDR + 12..] {
            *b = rand(256) as u8;
        }
        // The frame in 1 to 8 pieces, each at its own place.
        let pieces = 1 + rand(8) as usize;
        let mut cuts: Vec<usize> = (1..pieces).map(|_| rand(len as u64) as usize).collect();
        cuts.extend([0, len]);
        cuts.sort_unstable();
        cuts.dedup();
        let segs: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        for (j, &(a, b)) in segs.iter().enumerate() {
            let at = 0x40000 + 0x10000 * j as u64;
            tx.mem.write_slice(&f[a..b], GuestAddress(at)).unwrap();
            let last = j + 1 == segs.len();
            let j = j as u16;
            tx.desc(
                j,
                at,
                (b - a) as u32,
                if last { 0 } else { NEXT },
                if last { 0 } else { j + 1 },
            );
        }
        tx.offer(0);
        transmit(&sw, 0, &tx);
        let used = rx.used();
        let mut got = Vec::new();
        for &(head, n) in &used {
            let mut b = vec![0u8; n as usize];
            rx.mem
                .read_slice(&mut b, GuestAddress(0x10000 + 0x1000 * u64::from(head)))
                .unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(got.len(), len, "round {round}");
        assert_eq!(
            u16::from_le_bytes([got[10], got[11]]) as usize,
            used.len(),
            "round {round}: num_buffers"
        );
        assert!(
            got[VNET_HDR..] == f[VNET_HDR..],
            "round {round}: bytes differ"
        );
        sent_bytes += (len - VNET_HDR) as u64;
    }
    let b = counters(&sw, 1);
    assert_eq!((b.rx_frames, b.copies), (rounds, rounds));
    assert_eq!((b.rx_bytes, b.copied_bytes), (sent_bytes, sent_bytes));
    assert_eq!(b.dropped_malformed + b.dropped_no_buffer, 0);
}

#[test]
fn a_frame_the_posted_buffers_cannot_hold_waits_without_taking_them() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, true);
    // Sixteen 64-byte buffers cannot hold a 2000-byte frame: it waits, nothing is consumed.
    for i in 0..QSIZE {
        rx.desc(i, 0x10000 + 0x1000 * u64::from(i), 64, WRITE, 0);
        rx.offer(i);
    }
    send(&sw, &mut tx, &frame(MAC_B, MAC_A, 2000));
    assert!(rx.used().is_empty());
    assert_eq!(counters(&sw, 1).queued, 1);
}

/// What the kernel says of descriptor `fd` (for an eventfd: its count and its unique id), if
/// it is open.
fn fdinfo(fd: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()
}

#[test]
fn a_connections_exit_event_does_not_outlive_its_daemon() {
    // vhost-user-backend 0.24 takes the exit event's read end with into_raw_fd and never
    // closes it: without close_exit_events every VMM connection leaked a descriptor (found by
    // the vhost_user_msgs fuzz target, which ran out of descriptors).
    let sw = Switch::new(&Config {
        socket_dir: "/nonexistent".into(),
        networks: vec![NetworkConfig {
            name: "n".into(),
            ports: vec!["a".into()],
            uplink: None,
        }],
    })
    .unwrap();
    let backend = PortBackend::new(sw, 0).unwrap();
    let daemon = vhost_user_backend::VhostUserDaemon::new(
        "t".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let fds: Vec<i32> = backend.exit.handed_out();
    assert!(!fds.is_empty(), "the daemon asked for no exit event");
    let infos: Vec<Option<String>> = fds.iter().map(|&fd| fdinfo(fd)).collect();
    assert!(infos.iter().all(Option::is_some));
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    drop(daemon);
    backend.close_exit_events();
    // Closed: the number is free, or taken since by another descriptor (another test's).
    for (fd, info) in fds.iter().zip(infos) {
        assert_ne!(fdinfo(*fd), info, "descriptor {fd} is still the exit event");
    }
    assert!(backend.exit.handed_out().is_empty());
}

/// Networks and ports come and go at run time through the control requests, with one JSON
/// line each and a clear error for what is wrong; a deleted port's socket goes, and a port
/// of the same name can come back at once.
#[test]
fn networks_and_ports_change_at_run_time() {
    let dir = std::env::temp_dir().join(format!("wv-vsw-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sw = Switch::new(&Config {
        socket_dir: dir.clone(),
        networks: Vec::new(),
    })
    .unwrap();
    let err = |v: serde_json::Value| v["error"].as_str().unwrap_or("").to_string();
    assert_eq!(sw.control("net add lan")["ok"], true);
    assert!(err(sw.control("net add lan")).contains("exists already"));
    assert!(err(sw.control("net add .x")).contains("1-64"));
    assert!(err(sw.control("net add a uplink=")).contains("TAP name"));
    assert!(err(sw.control("net add a tap=x")).contains("uplink=TAP"));
    assert!(err(sw.control("port add nowhere/p")).contains("no network named 'nowhere'"));
    assert!(err(sw.control("port add lan")).contains("NETWORK/PORT"));
    assert!(err(sw.control("port add lan/a/b")).contains("1-64"));
    let r = sw.control("port add lan/web");
    let sock = port_socket(&dir, "lan", "web");
    assert_eq!(r["socket"], sock.display().to_string());
    assert!(sock.exists());
    assert!(err(sw.control("port add lan/web")).contains("exists already"));
    assert_eq!(sw.control("port add lan/db")["ok"], true);
    let st = sw.control("stats");
    assert_eq!(st["ports"].as_array().unwrap().len(), 2);
    assert_eq!(st["ports"][0]["port"], "web");
    assert_eq!(sw.control("nets")["networks"][0]["ports"][1], "db");
    assert_eq!(sw.control("port del lan/web")["ok"], true);
    assert!(!sock.exists(), "the deleted port's socket is removed");
    assert!(err(sw.control("port del lan/web")).contains("has no port 'web'"));
    assert_eq!(sw.control("port add lan/web")["ok"], true, "back at once");
    assert!(sock.exists());
    assert!(err(sw.control("frobnicate")).contains("unknown request"));
    assert_eq!(sw.control("net del lan")["ok"], true);
    assert!(!sock.exists() && !dir.join("lan").exists());
    assert!(err(sw.control("net del lan")).contains("no network named"));
    assert_eq!(sw.stats().len(), 0);
    // A frame from a deleted port's old index goes nowhere.
    sw.forward(0, &Source::Bytes(&frame([0xff; 6], MAC_A, 60)));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sender waiting for its turn at a contended port holds no lock of the switch: control
/// requests that change the table (a port added) and other senders go on meanwhile, and
/// deleting the port it waits for ends its wait at once (the frame dropped and counted).
#[test]
fn a_waiting_sender_stalls_nothing_else() {
    let dir = std::env::temp_dir().join(format!("wv-vsw-wait-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sw = Switch::new(&Config {
        socket_dir: dir.clone(),
        networks: vec![NetworkConfig {
            name: "n1".into(),
            ports: vec!["a".into(), "b".into(), "c".into()],
            uplink: None,
        }],
    })
    .unwrap();
    let rx = Guest::new();
    for i in 0..QSIZE {
        rx.desc(i, 0x10000 + u64::from(i) * 0x1000, 2048, WRITE, 0);
    }
    connect_rx(&sw, 1, &rx, false);
    // b's address learned; b takes 8 bits a second: a's first frame uses the burst, its
    // second must wait far longer than SHARES_MAX_WAIT.
    sw.forward(1, &Source::Bytes(&frame([0xff; 6], MAC_B, 60)));
    assert_eq!(sw.control("port set n1/b rate=8")["ok"], true);
    let f = frame(MAC_B, MAC_A, 500);
    sw.forward(0, &Source::Bytes(&f));
    let (sw2, f2) = (sw.clone(), f.clone());
    let waiting = std::thread::spawn(move || sw2.forward(0, &Source::Bytes(&f2)));
    let b = sw.read().port(1).unwrap().clone();
    while !b.gate.others_waiting(usize::MAX) {
        std::thread::yield_now();
    }
    // The table's write lock is free: a port comes, and stats are served.
    assert_eq!(sw.control("port add n1/d")["ok"], true);
    assert_eq!(sw.stats().len(), 4);
    assert!(b.gate.others_waiting(usize::MAX), "a still waits");
    assert_eq!(counters(&sw, 0).sched_dropped, 0);
    // Deleting b ends the wait at once.
    assert_eq!(sw.control("port del n1/b")["ok"], true);
    waiting.join().unwrap();
    let a = &sw.stats()[0];
    assert_eq!((a.port.as_str(), a.sched_dropped), ("a", 1));
    assert_eq!(sw.control("net del n1")["ok"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts the allocations of the threads that ask it to ([`count_allocations`]).
struct Counting;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn note_allocation() {
    let _ = ALLOCATIONS.try_with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n + 1));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the counting touches a
// thread-local cell only (const-initialised: it allocates nothing itself).
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns how many allocations this thread made meanwhile.
fn count_allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|c| c.set(Some(0)));
    f();
    ALLOCATIONS.with(|c| c.replace(None)).unwrap_or(0)
}

/// Through the scheduled path (shares, a reservation, a limit, the destination's dispatcher,
/// a sender's turn kept for its next frame), frames from a guest's transmit ring reach another
/// guest's posted buffers with one copy each and no allocation once the ports are warm.
#[test]
fn scheduled_frames_are_copied_once_and_allocate_nothing() {
    let sw = switch();
    let (tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    for i in 0..QSIZE {
        rx.desc(i, 0x10000 + u64::from(i) * 0x1000, 2048, WRITE, 0);
        rx.offer(i);
    }
    sw.forward(1, &Source::Bytes(&frame([0xff; 6], MAC_B, 60)));
    let set = "port set n1/a shares=3 reservation=8000000 limit=800000000";
    assert_eq!(sw.control(set)["ok"], true);
    assert_eq!(sw.control("port set n1/b rate=8000000000")["ok"], true);
    let f = frame(MAC_B, MAC_A, 1000);
    for i in 0..QSIZE {
        let at = 0x80000 + u64::from(i) * 0x1000;
        tx.mem.write_slice(&f, GuestAddress(at)).unwrap();
        tx.desc(i, at, f.len() as u32, 0, 0);
    }
    let b = PortBackend::new(sw.clone(), 0).unwrap();
    b.rx().mem = Some(tx.atomic());
    let mut tx = tx;
    let mut burst = |n: u16| {
        for i in 0..n {
            tx.offer(i);
        }
        b.transmit(&tx.vring);
    };
    burst(4);
    let v = count_allocations(|| drop(std::hint::black_box(vec![0u8; 10])));
    assert!(v > 0, "the counter counts");
    let n = count_allocations(|| burst(8));
    assert_eq!(n, 0, "allocations for 8 scheduled frames");
    let (a, r) = (counters(&sw, 0), counters(&sw, 1));
    assert_eq!((a.tx_frames, r.rx_frames), (12, 12));
    assert_eq!((r.copies, r.copied_bytes), (12, 12 * 988), "one copy each");
    assert_eq!(r.queued, 0);
}

// ---- Offloads: checksum and segmentation end to end (offload.rs) ----

use offload::{F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6};

/// The ones' complement sum of `b` folded to 16 bits, written here anew (not offload.rs's) so
/// that the tests check the switch's checksums independently.
fn ones(b: &[u8], start: u32) -> u16 {
    let mut s = start;
    for (i, x) in b.iter().enumerate() {
        s += if i % 2 == 0 {
            u32::from(*x) << 8
        } else {
            u32::from(*x)
        };
        s = (s & 0xffff) + (s >> 16);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Whether the TCP segment in Ethernet frame `f` (IPv4 or IPv6, no VLAN) has right checksums.
fn tcp_checksums_verify(f: &[u8]) -> bool {
    let v6 = f[12..14] == [0x86, 0xdd];
    let (l4, pseudo) = if v6 {
        let l4 = 14 + 40;
        let len = (f.len() - l4) as u32;
        let p = u32::from(ones(&f[14 + 8..14 + 40], 0)) + 6 + (len >> 16) + (len & 0xffff);
        (l4, p)
    } else {
        let ihl = usize::from(f[14] & 15) * 4;
        if ones(&f[14..14 + ihl], 0) != 0xffff {
            return false;
        }
        let l4 = 14 + ihl;
        let len = (f.len() - l4) as u32;
        (l4, u32::from(ones(&f[14 + 12..14 + 20], 0)) + 6 + len)
    };
    ones(&f[l4..], pseudo) == 0xffff
}

/// A TCP segment from MAC_A to `dst` (IPv4, or IPv6) with `payload` bytes of a pattern, as a
/// TSO sender hands it over: vnet header with NEEDS_CSUM and the TCP checksum field holding
/// the pseudo-header's sum (Linux's convention), gso_size `mss`.
fn tso_frame(dst: [u8; 6], v6: bool, payload: usize, mss: u16, seed: u8) -> Vec<u8> {
    let l3 = 14;
    let l4 = if v6 { l3 + 40 } else { l3 + 20 };
    let hdrs = l4 + 32; // TCP with 12 bytes of options (timestamps)
    let mut f = vec![0u8; VNET_HDR + hdrs + payload];
    let e = &mut f[VNET_HDR..];
    e[..6].copy_from_slice(&dst);
    e[6..12].copy_from_slice(&MAC_A);
    if v6 {
        e[12..14].copy_from_slice(&[0x86, 0xdd]);
        e[l3] = 0x60;
        e[l3 + 4..l3 + 6].copy_from_slice(&((32 + payload) as u16).to_be_bytes());
        e[l3 + 6] = 6;
        e[l3 + 7] = 64;
        for i in 0..32 {
            e[l3 + 8 + i] = 0x20 + i as u8;
        }
    } else {
        e[12..14].copy_from_slice(&[0x08, 0x00]);
        e[l3] = 0x45;
        e[l3 + 2..l3 + 4].copy_from_slice(&((20 + 32 + payload) as u16).to_be_bytes());
        e[l3 + 4..l3 + 6].copy_from_slice(&0xfff0u16.to_be_bytes()); // id, wraps
        e[l3 + 6] = 0x40; // DF
        e[l3 + 8] = 64;
        e[l3 + 9] = 6;
        e[l3 + 12..l3 + 20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let c = !ones(&e[l3..l4], 0);
        e[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    e[l4..l4 + 4].copy_from_slice(&[0x30, 0x39, 0x00, 0x50]);
    e[l4 + 4..l4 + 8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // seq, wraps
    e[l4 + 12] = 8 << 4;
    e[l4 + 13] = 0x80 | 0x18 | 0x01; // CWR, PSH, ACK, FIN
    e[l4 + 14..l4 + 16].copy_from_slice(&0xffffu16.to_be_bytes());
    for (i, b) in e[hdrs..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13).wrapping_add(seed);
    }
    let tcp_len = (32 + payload) as u32;
    let pseudo = if v6 {
        u32::from(ones(&e[l3 + 8..l3 + 40], 0)) + 6 + (tcp_len >> 16) + (tcp_len & 0xffff)
    } else {
        u32::from(ones(&e[l3 + 12..l3 + 20], 0)) + 6 + tcp_len
    };
    let p = ones(&[], pseudo);
    e[l4 + 16..l4 + 18].copy_from_slice(&p.to_be_bytes());
    f[0] = offload::NEEDS_CSUM;
    f[1] = if v6 {
        offload::GSO_TCPV6
    } else {
        offload::GSO_TCPV4
    };
    f[2..4].copy_from_slice(&(hdrs as u16).to_le_bytes());
    f[4..6].copy_from_slice(&mss.to_le_bytes());
    f[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    f[8..10].copy_from_slice(&16u16.to_le_bytes());
    f
}

/// Port `port`'s driver acked `features` (as a frontend's SET_FEATURES does).
fn ack(sw: &Arc<Switch>, port: usize, features: u64) {
    PortBackend::new(sw.clone(), port)
        .unwrap()
        .acked_features(features);
}

impl Guest {
    /// Posts `n` receive buffers of `size` bytes, one descriptor each, from 0x10000 on.
    fn post(&mut self, n: u16, size: u32) {
        for i in 0..n {
            self.desc(i, 0x10000 + u64::from(size) * u64::from(i), size, WRITE, 0);
            self.offer(i);
        }
    }

    /// The frames delivered since used index `seen` (mergeable: joined by num_buffers), with
    /// their vnet headers; their heads are offered again.
    fn frames(&mut self, seen: &mut u16, size: u32) -> Vec<Vec<u8>> {
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut left = 0u16;
        while *seen != used {
            let at = GuestAddress(USED + 4 + 8 * u64::from(*seen % QSIZE));
            let head: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(
                    &mut b,
                    GuestAddress(0x10000 + u64::from(size) * u64::from(head)),
                )
                .unwrap();
            if left == 0 {
                left = u16::from_le_bytes([b[10], b[11]]);
                out.push(b);
            } else {
                out.last_mut().unwrap().extend_from_slice(&b);
            }
            left -= 1;
            self.offer(head as u16);
            *seen = seen.wrapping_add(1);
        }
        out
    }
}

/// Checks that `segs` (delivered frames, vnet header first) are `orig` (a TSO frame) cut at
/// `mss`: plain headers, lengths, ids, sequence numbers, flags, verifying checksums, and
/// payloads that join into the original's.
fn check_segments(orig: &[u8], segs: &[Vec<u8>], v6: bool, mss: usize) {
    let e = &orig[VNET_HDR..];
    let l4 = if v6 { 54 } else { 34 };
    let hdrs = l4 + 32;
    let payload = &e[hdrs..];
    assert_eq!(
        segs.len(),
        payload.len().div_ceil(mss),
        "ceil(payload/MSS) frames"
    );
    let mut joined = Vec::new();
    let seq0 = u32::from_be_bytes(e[l4 + 4..l4 + 8].try_into().unwrap());
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(&s[..10], &[0; 10], "segment {i}: a plain header");
        let f = &s[VNET_HDR..];
        let last = i + 1 == segs.len();
        let n = f.len() - hdrs;
        assert_eq!(
            n,
            if last { payload.len() - i * mss } else { mss },
            "segment {i}"
        );
        assert_eq!(&f[..14], &e[..14]);
        if v6 {
            assert_eq!(
                u16::from_be_bytes([f[18], f[19]]) as usize,
                32 + n,
                "payload length"
            );
        } else {
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, 20 + 32 + n);
            let id = u16::from_be_bytes([f[18], f[19]]);
            assert_eq!(id, 0xfff0u16.wrapping_add(i as u16), "segment {i}: IP id");
        }
        let seq = u32::from_be_bytes(f[l4 + 4..l4 + 8].try_into().unwrap());
        assert_eq!(seq, seq0.wrapping_add((i * mss) as u32), "segment {i}: seq");
        let flags = f[l4 + 13];
        assert_eq!(
            flags & 0x09 != 0,
            last,
            "segment {i}: FIN/PSH on the last only"
        );
        assert_eq!(
            flags & 0x80 != 0,
            i == 0,
            "segment {i}: CWR on the first only"
        );
        assert_eq!(flags & 0x10, 0x10, "ACK on every segment");
        assert_eq!(&f[l4 + 18..hdrs], &e[l4 + 18..hdrs], "options kept");
        assert!(tcp_checksums_verify(f), "segment {i}: checksums verify");
        joined.extend_from_slice(&f[hdrs..]);
    }
    assert!(joined == payload, "the payloads join into the original");
}

/// A 64 KiB TSO4 segment from a TSO sender reaches a GUEST_TSO receiver as one frame, its
/// header intact and every byte as sent, copied once.
#[test]
fn a_64k_tso4_segment_crosses_as_one_frame() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO4 | F_HOST_TSO6);
    ack(&sw, 1, F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6);
    connect_rx(&sw, 1, &rx, true);
    rx.post(QSIZE, 8192);
    let f = tso_frame(MAC_B, false, 65_535 - 52, 1448, 1);
    assert_eq!(f.len(), VNET_HDR + 65_549);
    send(&sw, &mut tx, &f);
    let got = rx.frames(&mut 0, 8192);
    assert_eq!(got.len(), 1, "one frame");
    let g = &got[0];
    assert_eq!(&g[..10], &f[..10], "the offload header as sent");
    assert_eq!(u16::from_le_bytes([g[10], g[11]]), 9, "num_buffers");
    assert!(g[VNET_HDR..] == f[VNET_HDR..], "every byte as sent");
    let (a, b) = (counters(&sw, 0), counters(&sw, 1));
    assert_eq!(
        (a.tx_frames, a.tx_gso_frames, a.dropped_bad_offload),
        (1, 1, 0)
    );
    assert_eq!((b.rx_frames, b.rx_gso_frames, b.segmented), (1, 1, 0));
    assert_eq!((b.rx_bytes, b.copied_bytes, b.copies), (65_549, 65_549, 1));
}

/// The same segment to a receiver without GUEST_TSO: cut into MSS-sized frames whose
/// checksums verify and whose payloads join into the original, 16 buffers at a time (the rest
/// waits in a slot of the port and goes as the guest posts buffers again).
#[test]
fn a_tso4_segment_is_cut_for_a_receiver_without_guest_tso() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO4);
    connect_rx(&sw, 1, &rx, true);
    rx.post(QSIZE, 2048);
    let f = tso_frame(MAC_B, false, 65_535 - 52, 1448, 2);
    send(&sw, &mut tx, &f);
    let p1 = sw.read().port(1).unwrap().clone();
    let (mut seen, mut segs) = (0u16, Vec::new());
    for _ in 0..10 {
        let new = rx.frames(&mut seen, 2048);
        if new.is_empty() {
            break;
        }
        segs.extend(new);
        // The guest posted its buffers again and kicks.
        Switch::flush(&p1);
    }
    check_segments(&f, &segs, false, 1448);
    let b = counters(&sw, 1);
    assert_eq!((b.segmented, b.segments, b.rx_frames), (1, 46, 46));
    assert_eq!((b.queued, b.rx_gso_frames), (1, 0));
    assert_eq!(b.dropped_malformed + b.dropped_no_buffer, 0);
}

/// TSO6, cut: no slot needed, so every delivered byte was copied exactly once (headers
/// rebuilt per segment count as written once, payload copied once).
#[test]
fn a_tso6_segment_is_cut_with_one_copy_per_byte() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO6);
    ack(&sw, 1, F_GUEST_CSUM | F_GUEST_TSO4); // IPv4 only: IPv6 segments are cut
    connect_rx(&sw, 1, &rx, false);
    rx.post(QSIZE, 8192);
    let f = tso_frame(MAC_B, true, 60_001, 8000, 3);
    send(&sw, &mut tx, &f);
    let segs = rx.frames(&mut 0, 8192);
    check_segments(&f, &segs, true, 8000);
    let b = counters(&sw, 1);
    assert_eq!(
        (b.segmented, b.segments, b.rx_frames, b.queued),
        (1, 8, 8, 0)
    );
    assert_eq!(b.copied_bytes, b.rx_bytes, "one copy per delivered byte");
    assert_eq!(b.rx_bytes, 8 * 86 + 60_001, "headers rebuilt per segment");
}

/// A partially checksummed UDP frame goes to a receiver without GUEST_CSUM with its checksum
/// filled in and right, and to one with GUEST_CSUM as sent, its header intact; a flooded TSO
/// frame reaches each port of the network in the form that port takes.
#[test]
fn flooded_frames_reach_each_port_in_its_own_form() {
    let sw = Switch::new(&Config {
        socket_dir: PathBuf::from("/nonexistent"),
        networks: vec![NetworkConfig {
            name: "n".into(),
            ports: vec!["a".into(), "b".into(), "c".into()],
            uplink: None,
        }],
    })
    .unwrap();
    let (mut tx, mut rb, mut rc) = (Guest::new(), Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO4);
    ack(&sw, 1, F_GUEST_CSUM | F_GUEST_TSO4);
    connect_rx(&sw, 1, &rb, true);
    connect_rx(&sw, 2, &rc, true);
    rb.post(QSIZE, 4096);
    rc.post(QSIZE, 4096);
    // UDP/IPv4 to an unknown MAC (flooded): 8 bytes of header, 300 of data.
    let mut f = vec![0u8; VNET_HDR + 14 + 20 + 308];
    {
        let e = &mut f[VNET_HDR..];
        e[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x77]);
        e[6..12].copy_from_slice(&MAC_A);
        e[12..14].copy_from_slice(&[8, 0]);
        e[14] = 0x45;
        e[16..18].copy_from_slice(&328u16.to_be_bytes());
        e[22] = 64;
        e[23] = 17;
        e[26..34].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let c = !ones(&e[14..34], 0);
        e[24..26].copy_from_slice(&c.to_be_bytes());
        e[34..38].copy_from_slice(&[0x13, 0x88, 0x13, 0x89]);
        e[38..40].copy_from_slice(&308u16.to_be_bytes());
        for (i, b) in e[42..].iter_mut().enumerate() {
            *b = (i * 31) as u8;
        }
        let pseudo = u32::from(ones(&e[26..34], 0)) + 17 + 308;
        e[40..42].copy_from_slice(&ones(&[], pseudo).to_be_bytes());
    }
    f[..10].copy_from_slice(&[1, 0, 0, 0, 0, 0, 34, 0, 6, 0]);
    send(&sw, &mut tx, &f);
    let (mut sb, mut sc) = (0u16, 0u16);
    let gb = rb.frames(&mut sb, 4096);
    let gc = rc.frames(&mut sc, 4096);
    assert_eq!((gb.len(), gc.len()), (1, 1));
    assert_eq!(&gb[0][..10], &f[..10], "GUEST_CSUM: the header as sent");
    assert!(gb[0][VNET_HDR..] == f[VNET_HDR..]);
    assert_eq!(&gc[0][..10], &[0; 10], "no GUEST_CSUM: a plain header");
    let e = &gc[0][VNET_HDR..];
    assert_eq!(&e[..40], &f[VNET_HDR..VNET_HDR + 40]);
    assert_eq!(&e[42..], &f[VNET_HDR + 42..]);
    let pseudo = u32::from(ones(&e[26..34], 0)) + 17 + 308;
    assert_eq!(
        ones(&e[34..], pseudo),
        0xffff,
        "the filled checksum verifies"
    );
    assert_eq!(counters(&sw, 2).csum_filled, 1);
    assert_eq!(counters(&sw, 1).csum_filled, 0);

    // A TSO segment to a broadcast address: b takes it whole, c gets it cut.
    let mut t = tso_frame([0xff; 6], false, 9000, 1448, 4);
    t[VNET_HDR + 6..VNET_HDR + 12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x0a]);
    send(&sw, &mut Guest::new(), &t);
    let gb = rb.frames(&mut sb, 4096);
    let gc = rc.frames(&mut sc, 4096);
    assert_eq!(gb.len(), 1);
    assert!(gb[0][..10] == t[..10] && gb[0][VNET_HDR..] == t[VNET_HDR..]);
    check_segments(&t, &gc, false, 1448);
    assert_eq!(counters(&sw, 1).rx_gso_frames, 1);
    assert_eq!(counters(&sw, 2).segments, 7);
}

/// Headers that do not fit their frame or what the sender acked are dropped and counted on
/// the sender's port, never delivered; the port goes on. A frame up to 65550 bytes is taken,
/// a longer one refused.
#[test]
fn bad_offload_headers_are_counted_drops() {
    let sw = switch();
    let mut rx = Guest::new();
    ack(&sw, 0, F_CSUM | F_HOST_TSO4);
    connect_rx(&sw, 1, &rx, true);
    rx.post(QSIZE, 8192);
    let good = tso_frame(MAC_B, false, 4000, 1000, 5);
    type Spoil = fn(&mut Vec<u8>);
    let spoils: &[(&str, Spoil)] = &[
        ("gso_size 0", |f| f[4..6].fill(0)),
        ("gso_size below TCP's minimum", |f| {
            f[4..6].copy_from_slice(&(offload::MIN_MSS - 1).to_le_bytes())
        }),
        ("csum_start in the Ethernet header", |f| {
            f[1] = 0;
            f[6..8].copy_from_slice(&0u16.to_le_bytes());
        }),
        ("UDP", |f| f[1] = 3),
        ("ECN", |f| f[1] |= 0x80),
        ("TCPV6 not acked", |f| f[1] = offload::GSO_TCPV6),
        ("hdr_len past the end", |f| {
            f[2..4].copy_from_slice(&0xf000u16.to_le_bytes())
        }),
        ("no NEEDS_CSUM", |f| f[0] = 0),
        ("csum_start not TCP's", |f| f[6] = 30),
        ("csum_offset not TCP's", |f| f[8] = 6),
        ("not TCP", |f| f[VNET_HDR + 23] = 17),
        ("IP length", |f| f[VNET_HDR + 17] ^= 1),
        ("a fragment", |f| f[VNET_HDR + 20] |= 0x20),
        ("not IP", |f| f[VNET_HDR + 12] = 0x88),
        ("no payload", |f| f.truncate(VNET_HDR + 66)),
        ("csum past the end", |f| {
            f[1] = 0;
            f[6..8].copy_from_slice(&4100u16.to_le_bytes());
        }),
    ];
    for (i, (what, spoil)) in spoils.iter().enumerate() {
        let mut f = good.clone();
        spoil(&mut f);
        let mut tx = Guest::new();
        send(&sw, &mut tx, &f);
        assert_eq!(
            counters(&sw, 0).dropped_bad_offload,
            i as u64 + 1,
            "{what}: counted"
        );
        assert!(rx.frames(&mut 0, 8192).is_empty(), "{what}: not delivered");
    }
    // The port goes on.
    let mut tx = Guest::new();
    send(&sw, &mut tx, &good);
    assert_eq!(counters(&sw, 1).rx_gso_frames, 0);
    assert_eq!(counters(&sw, 1).segments, 4, "cut: b acked no GUEST_TSO");
    // 65550 bytes (plus the header) are taken; 65551 are not.
    for (len, taken) in [(65_550, true), (65_551, false)] {
        let before = counters(&sw, 1).rx_frames;
        let malformed = counters(&sw, 0).dropped_malformed;
        let mut f = frame(MAC_B, MAC_A, VNET_HDR + len);
        f[..VNET_HDR].fill(0);
        send(&sw, &mut Guest::new(), &f);
        assert_eq!(
            counters(&sw, 1).rx_frames - before,
            u64::from(taken),
            "{len}"
        );
        assert_eq!(
            counters(&sw, 0).dropped_malformed - malformed,
            u64::from(!taken)
        );
    }
}

/// Cutting a segment and filling checksums allocate nothing per frame once the ports are warm.
#[test]
fn offload_fallbacks_allocate_nothing() {
    let sw = switch();
    let (tx, mut rx) = (Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO4);
    connect_rx(&sw, 1, &rx, true);
    rx.post(QSIZE, 4096);
    let f = tso_frame(MAC_B, false, 2000, 1000, 6);
    for i in 0..4u16 {
        let at = 0x80000 + u64::from(i) * 0x2000;
        tx.mem.write_slice(&f, GuestAddress(at)).unwrap();
        tx.desc(i, at, f.len() as u32, 0, 0);
    }
    let b = PortBackend::new(sw.clone(), 0).unwrap();
    b.rx().mem = Some(tx.atomic());
    let mut tx = tx;
    tx.offer(0);
    b.transmit(&tx.vring);
    let mut seen = 0;
    assert_eq!(rx.frames(&mut seen, 4096).len(), 2);
    let n = count_allocations(|| {
        for i in 1..4 {
            tx.offer(i);
        }
        b.transmit(&tx.vring);
    });
    assert_eq!(n, 0, "allocations for 3 segments cut");
    let c = counters(&sw, 1);
    assert_eq!((c.segmented, c.segments), (4, 8));
}

/// A guest whose transmit ring holds `f`.
fn tx_again(f: &[u8]) -> Guest {
    let mut tx = Guest::new();
    tx.mem.write_slice(f, GuestAddress(0x8000)).unwrap();
    tx.desc(0, 0x8000, f.len() as u32, 0, 0);
    tx.offer(0);
    tx
}

/// Through the uplink: a TSO segment from a VM port reaches a TAP (in a network namespace of
/// this test's own) as one frame, which the host's kernel takes whole (read back with a raw
/// socket on the TAP); without the TAP's offloads, as segments the switch cut. Needs
/// CAP_NET_ADMIN; skipped with a note without it.
#[test]
fn a_tso_segment_reaches_the_uplink_tap_whole() {
    std::thread::spawn(|| {
        // SAFETY: unshare affects this thread only (a network namespace of its own).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: no network namespace ({})",
                std::io::Error::last_os_error()
            );
            return;
        }
        let sw = Switch::new(&Config {
            socket_dir: PathBuf::from("/nonexistent"),
            networks: vec![NetworkConfig {
                name: "n".into(),
                ports: vec!["a".into()],
                uplink: Some("up0".into()),
            }],
        })
        .unwrap();
        assert_eq!(
            counters(&sw, 0).features,
            offload::OFFLOADS,
            "the kernel took the uplink's offloads"
        );
        let name = std::ffi::CString::new("up0").unwrap();
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: a new packet socket, owned below.
        let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(s >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `s` is new and ours.
        let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        // SAFETY: bind reads `sa`, valid for its length.
        let r = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0);
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        ack(&sw, 1, F_CSUM | F_HOST_TSO4);
        let f = tso_frame([0x52, 0x54, 0, 0, 0, 0x99], false, 65_535 - 52, 1448, 7);
        let mut tx = Guest::new();
        tx.mem.write_slice(&f, GuestAddress(0x8000)).unwrap();
        tx.desc(0, 0x8000, f.len() as u32, 0, 0);
        tx.offer(0);
        transmit(&sw, 1, &tx);
        let up = counters(&sw, 0);
        assert_eq!((up.rx_frames, up.rx_gso_frames), (1, 1), "{up:?}");
        // The kernel's side: the segment as one frame (other traffic, such as IPv6
        // solicitations, skipped).
        let mut buf = vec![0u8; 70_000];
        loop {
            // SAFETY: recv writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0, "the frame came: {}", std::io::Error::last_os_error());
            if buf[6..12] == MAC_A {
                assert_eq!(n as usize, f.len() - VNET_HDR, "one frame");
                assert!(buf[..n as usize] == f[VNET_HDR..], "as sent");
                break;
            }
        }
        // As if the kernel had refused the offloads: the switch cuts the segment itself.
        lock(&sw.read().port(0).unwrap().rx).features = 0;
        transmit(&sw, 1, &tx_again(&f));
        let mut segs = Vec::new();
        while segs.len() < 46 {
            // SAFETY: recv writes at most buf.len() bytes into `buf`.
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n > 0,
                "46 segments came: {}",
                std::io::Error::last_os_error()
            );
            if buf[6..12] == MAC_A {
                let mut seg = vec![0u8; VNET_HDR];
                seg.extend_from_slice(&buf[..n as usize]);
                segs.push(seg);
            }
        }
        check_segments(&f, &segs, false, 1448);
        assert_eq!(counters(&sw, 0).segments, 46);
    })
    .join()
    .unwrap();
}

/// Arbitrary vnet headers and header bytes over real segments, to receivers with arbitrary
/// features: every frame is delivered in some form or counted as dropped, never a panic, and
/// what is delivered whole is what was sent.
#[test]
fn spoiled_offload_headers_never_panic() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let all = [
        F_CSUM,
        F_GUEST_CSUM,
        F_HOST_TSO4,
        F_HOST_TSO6,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
    ];
    for round in 0..400 {
        let sw = switch();
        let mut rx = Guest::new();
        let pick = |bits: u64| {
            all.iter()
                .enumerate()
                .filter(|(i, _)| bits >> i & 1 == 1)
                .fold(0, |a, (_, f)| a | f)
        };
        ack(&sw, 0, pick(rand(64)) | F_CSUM);
        ack(&sw, 1, pick(rand(64)));
        connect_rx(&sw, 1, &rx, rand(2) == 1);
        rx.post(QSIZE, 8192);
        let mut f = tso_frame(
            MAC_B,
            rand(2) == 1,
            1 + rand(20_000) as usize,
            1 + rand(3000) as u16,
            9,
        );
        for _ in 0..rand(4) {
            let at = rand((VNET_HDR + 110) as u64) as usize;
            f[at] = rand(256) as u8;
        }
        if rand(4) == 0 {
            f.truncate(VNET_HDR + 14 + rand((f.len() - VNET_HDR - 14) as u64) as usize);
        }
        send(&sw, &mut Guest::new(), &f);
        let (a, b) = (counters(&sw, 0), counters(&sw, 1));
        assert_eq!(
            a.tx_frames + a.dropped_bad_offload + a.dropped_malformed,
            1,
            "round {round}"
        );
        if b.rx_gso_frames == 1 {
            let g = rx.frames(&mut 0, 8192);
            assert!(g[0][VNET_HDR..] == f[VNET_HDR..], "round {round}");
        }
    }
}

/// An eventfd as the call of `g`'s queue: it counts the signals the switch sends.
fn calls(g: &Guest) -> vmm_sys_util::eventfd::EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let fd = e.try_clone().unwrap().into_raw_fd();
    // SAFETY: `fd` is a new descriptor (a clone of the eventfd) that nothing else owns.
    g.vring
        .set_call(Some(unsafe { std::fs::File::from_raw_fd(fd) }));
    e
}

/// Signals counted on `e` since the last time.
fn signals(e: &vmm_sys_util::eventfd::EventFd) -> u64 {
    e.read().unwrap_or(0)
}

fn used_flags(g: &Guest) -> u16 {
    g.mem.read_obj(GuestAddress(USED)).unwrap()
}

#[test]
fn a_batch_of_frames_is_told_once_and_kicks_come_only_when_awaited() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    let (tx_calls, rx_calls) = (calls(&tx), calls(&rx));
    rx.post(QSIZE, 2048);
    // Eight frames in a's ring, one kick: b is told once, a once (its chains back).
    for i in 0..8u16 {
        let f = frame(MAC_B, MAC_A, 100 + usize::from(i));
        let at = 0x8000 + 0x800 * u64::from(i);
        tx.mem.write_slice(&f, GuestAddress(at)).unwrap();
        tx.desc(i, at, f.len() as u32, 0, 0);
        tx.offer(i);
    }
    transmit(&sw, 0, &tx);
    assert_eq!(rx.used().len(), 8, "every frame delivered");
    assert_eq!(tx.used().len(), 8, "every chain returned");
    assert_eq!(
        signals(&rx_calls),
        1,
        "the receiver is told once for the batch"
    );
    assert_eq!(
        signals(&tx_calls),
        1,
        "the sender is told once for the batch"
    );
    assert_eq!(
        used_flags(&tx),
        0,
        "kicks asked for again once the ring is empty"
    );
    // b's kick finds nothing waiting: it need not kick for its next buffers.
    let b = sw.read().port(1).unwrap().clone();
    Switch::flush(&b);
    assert_eq!(used_flags(&rx), 1, "VRING_USED_F_NO_NOTIFY");
    // A frame that finds no buffer (8 of 16 left, then none) asks for kicks again.
    for _ in 0..9 {
        send(&sw, &mut tx, &frame(MAC_B, MAC_A, 80));
    }
    assert_eq!(rx.used().len(), 16);
    assert_eq!(counters(&sw, 1).queued, 1, "the last frame waits in a slot");
    assert_eq!(used_flags(&rx), 0, "kicks asked for again");
    assert!(
        signals(&rx_calls) >= 1,
        "the receiver is told of its full ring"
    );
    // Its buffers come back with a kick: the frame held goes (copied twice, the slot's copy
    // and the delivery; every other frame once).
    let mut seen = 0u16;
    let _ = rx.frames(&mut seen, 2048);
    Switch::flush(&b);
    assert_eq!(rx.used().len(), 17);
    assert_eq!(signals(&rx_calls), 1);
    let c = counters(&sw, 1);
    assert_eq!((c.rx_frames, c.copies, c.dropped_no_buffer), (17, 18, 0));
}

#[test]
fn a_receive_buffer_longer_than_any_frame_takes_a_64k_segment() {
    // A driver without mergeable buffers posts 17 pages for a 64 KiB segment: more than
    // MAX_FRAME, which is not taken, but not refused.
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO4);
    ack(&sw, 1, F_GUEST_CSUM | F_GUEST_TSO4);
    connect_rx(&sw, 1, &rx, false);
    rx.desc(0, 0x10000, 17 * 4096, WRITE, 0);
    rx.offer(0);
    let f = tso_frame(MAC_B, false, 65_535 - 52, 1448, 3);
    send(&sw, &mut tx, &f);
    assert_eq!(rx.used(), vec![(0, f.len() as u32)]);
    let mut got = vec![0u8; f.len()];
    rx.mem.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
    assert!(got[VNET_HDR..] == f[VNET_HDR..], "every byte as sent");
    assert_eq!(counters(&sw, 1).dropped_malformed, 0);
}

#[test]
fn a_driver_that_asks_for_no_interrupts_is_not_called() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    connect_rx(&sw, 1, &rx, false);
    let (tx_calls, rx_calls) = (calls(&tx), calls(&rx));
    rx.post(QSIZE, 2048);
    // VRING_AVAIL_F_NO_INTERRUPT on both drivers' rings (they poll).
    for g in [&tx, &rx] {
        g.mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
    }
    send(&sw, &mut tx, &frame(MAC_B, MAC_A, 100));
    assert_eq!(
        (rx.used().len(), tx.used().len()),
        (1, 1),
        "served all the same"
    );
    assert_eq!((signals(&rx_calls), signals(&tx_calls)), (0, 0));
    // Interrupts wanted again: the next frame is told of.
    for g in [&tx, &rx] {
        g.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    }
    send(&sw, &mut tx, &frame(MAC_B, MAC_A, 100));
    assert_eq!(rx.used().len(), 2);
    assert_eq!((signals(&rx_calls), signals(&tx_calls)), (1, 1));
}

/// A driver that acks other features (after a reset, say) does not get the frames held for
/// the one before: a segment partly delivered, cut for a driver without GUEST_TSO, is dropped
/// and counted, not delivered again whole to the new one.
#[test]
fn frames_held_for_a_driver_are_dropped_when_its_features_change() {
    let sw = switch();
    let (mut tx, mut rx) = (Guest::new(), Guest::new());
    ack(&sw, 0, F_CSUM | F_HOST_TSO4);
    connect_rx(&sw, 1, &rx, true);
    rx.post(QSIZE, 2048);
    let f = tso_frame(MAC_B, false, 65_535 - 52, 1448, 2);
    send(&sw, &mut tx, &f);
    let mut seen = 0u16;
    let first = rx.frames(&mut seen, 2048);
    assert!(!first.is_empty() && first.len() < 46, "{}", first.len());
    assert_eq!(counters(&sw, 1).queued, 1);
    ack(&sw, 1, F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4);
    let p1 = sw.read().port(1).unwrap().clone();
    Switch::flush(&p1);
    assert!(
        rx.frames(&mut seen, 2048).is_empty(),
        "a frame held for the old driver reached the new one"
    );
    assert_eq!(counters(&sw, 1).dropped_no_buffer, 1);
}
