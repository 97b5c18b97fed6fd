//! A peer that breaks the protocol, stalls, goes silent or stops reading: the node closes
//! that connection with a clear error naming the peer's id and address (and neither panics,
//! hangs nor buffers without bound). Node 0 runs in this process; node 1 is a raw socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use wv_dsm::proto::{decode, encode, Access, Geometry, Msg, PROTOCOL_VERSION};
use wv_dsm::{Backing, Config, Listener, Node, Region};

const PAGES: u64 = 16;
const BYTES: usize = 16 * 4096;

fn geometry() -> Geometry {
    geometry_of(PAGES)
}

fn geometry_of(pages: u64) -> Geometry {
    Geometry {
        nodes: 2,
        page_size: 4096,
        region_size: pages * 4096,
    }
}

/// The fake node 1's address as node 0 knows it (it never listens there).
fn fake_addr() -> SocketAddr {
    FAKE.with(|a| *a)
}

thread_local! {
    static FAKE: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
}

/// Node 0's configuration in these tests: a peer timeout long enough that only the tests
/// about liveness see one.
fn config(me: SocketAddr) -> Config {
    let mut cfg = Config::new(0, vec![me, fake_addr()]).with_peer_timeout(Duration::from_secs(30));
    cfg.join_timeout = Duration::from_secs(20);
    cfg
}

/// Starts node 0 of a two-node cluster and connects a fake node 1 that sends `init`.
fn start(init: Msg) -> (std::thread::JoinHandle<std::io::Result<Node>>, TcpStream) {
    start_with(init, config, BYTES)
}

fn start_with(
    init: Msg,
    cfg: impl FnOnce(SocketAddr) -> Config,
    bytes: usize,
) -> (std::thread::JoinHandle<std::io::Result<Node>>, TcpStream) {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let c = cfg(l.local_addr().unwrap());
    assert_eq!(c.peers[1], fake_addr());
    let addr = c.peers[0];
    let node =
        std::thread::spawn(move || Node::join(l, c, Region::map(bytes, Backing::Anonymous)?));
    let mut s = TcpStream::connect(addr).unwrap();
    let mut b = Vec::new();
    encode(&init, &mut b);
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (node, s)
}

fn joined() -> (Node, TcpStream) {
    joined_with(config, PAGES)
}

fn joined_with(cfg: impl FnOnce(SocketAddr) -> Config, pages: u64) -> (Node, TcpStream) {
    let (node, mut s) = start_with(
        Msg::Init {
            version: PROTOCOL_VERSION,
            node: 1,
            geometry: geometry_of(pages),
            mirror: false,
        },
        cfg,
        usize::try_from(pages).unwrap() * 4096,
    );
    let mut reply = [0u8; 32];
    s.read_exact(&mut reply).unwrap();
    (node.join().unwrap().expect("join"), s)
}

/// The next message from node 0 other than a heartbeat.
fn next_msg(s: &mut TcpStream, g: &Geometry) -> Msg {
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut b = vec![0u8; 4 + u32::from_le_bytes(len) as usize];
        b[..4].copy_from_slice(&len);
        s.read_exact(&mut b[4..]).unwrap();
        let (m, used) = decode(&b, g).unwrap().unwrap();
        assert_eq!(used, b.len());
        if m != Msg::Ping {
            return m;
        }
    }
}

/// Node 0's error about node 1, without the address it starts with.
fn reason(e: &wv_dsm::PeerError) -> &str {
    let prefix = format!("{}: ", fake_addr());
    assert_eq!(e.peer, 1);
    e.message
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{e} does not name {prefix}"))
}

/// Sends `bytes` as node 1 and expects node 0 to close the connection with `error`.
fn expect_close(bytes: &[u8], error: &str) {
    let (node, mut s) = joined();
    s.write_all(bytes).unwrap();
    let e = node
        .wait_error(Duration::from_secs(20))
        .expect("no error reported");
    assert_eq!(reason(&e), error);
    assert_eq!(node.failed(), Some(e));
    // The connection is closed: the fake peer reads end-of-file.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(node.errors().len(), 1);
}

fn msg(m: Msg) -> Vec<u8> {
    let mut b = Vec::new();
    encode(&m, &mut b);
    b
}

#[test]
fn page_outside_the_region_closes_the_connection() {
    // Node 1 manages odd pages, so node 0 is asked for even ones: ask for page 98.
    expect_close(
        &msg(Msg::GetPage {
            access: Access::Write,
            page: 98,
            have: 0,
        }),
        "page 98 outside the region (16 pages)",
    );
}

#[test]
fn unrequested_page_closes_the_connection() {
    expect_close(
        &msg(Msg::Page {
            access: Access::Read,
            page: 3,
            version: 4,
            data: Some(vec![1; 4096]),
        }),
        "PAGE (Read) for page 3 from node 1, which this node did not request",
    );
}

#[test]
fn ack_without_invalidation_closes_the_connection() {
    expect_close(
        &msg(Msg::InvAck { page: 2 }),
        "INV_ACK for page 2 from node 1, which was not invalidated",
    );
}

#[test]
fn unknown_type_and_bad_lengths_close_the_connection() {
    expect_close(&[4, 0, 0, 0, 42, 0, 0, 0], "unknown message type 42");
    expect_close(&[0, 0, 1, 0], "frame length 65536 outside 4..=4124");
    let mut short = msg(Msg::VldPage {
        access: Access::Read,
        page: 2,
        version: 0,
    });
    short[0] -= 1;
    short.pop();
    expect_close(&short, "VLD_PAGE of 15 bytes, expected 16");
}

#[test]
fn second_init_closes_the_connection() {
    expect_close(
        &msg(Msg::Init {
            version: PROTOCOL_VERSION,
            node: 1,
            geometry: geometry(),
            mirror: false,
        }),
        "INIT after the connection was set up",
    );
}

#[test]
fn mismatched_init_fails_the_join() {
    let g = Geometry {
        region_size: 8 * 4096,
        ..geometry()
    };
    let (node, _s) = start(Msg::Init {
        version: PROTOCOL_VERSION,
        node: 1,
        geometry: g,
        mirror: false,
    });
    let e = node
        .join()
        .unwrap()
        .err()
        .expect("join must fail")
        .to_string();
    assert!(
        e.contains("node 1 has geometry") && e.contains("region_size: 32768"),
        "{e}"
    );
    let (node, _s) = start(Msg::Init {
        version: 9,
        node: 1,
        geometry: geometry(),
        mirror: false,
    });
    let e = node
        .join()
        .unwrap()
        .err()
        .expect("join must fail")
        .to_string();
    assert!(e.contains("node 1 speaks protocol 9, this node 3"), "{e}");
}

#[test]
fn a_good_peer_is_served() {
    // The same fake peer, following the protocol: node 0 owns page 2 (manager 0) and serves a
    // read as zeros without data.
    let (node, mut s) = joined();
    s.write_all(&msg(Msg::GetPage {
        access: Access::Read,
        page: 2,
        have: 0,
    }))
    .unwrap();
    let g = geometry();
    let m = next_msg(&mut s, &g);
    assert_eq!(
        m,
        Msg::Page {
            access: Access::Read,
            page: 2,
            version: 0,
            data: None
        }
    );
    s.write_all(&msg(Msg::VldPage {
        access: Access::Read,
        page: 2,
        version: 0,
    }))
    .unwrap();
    // Then a write by node 1: still no data (never written), and node 1 becomes the owner.
    s.write_all(&msg(Msg::GetPage {
        access: Access::Write,
        page: 2,
        have: 0,
    }))
    .unwrap();
    let m = next_msg(&mut s, &g);
    assert_eq!(
        m,
        Msg::Page {
            access: Access::Write,
            page: 2,
            version: 0,
            data: None
        }
    );
    // A VLD_PAGE at the wrong version is refused.
    s.write_all(&msg(Msg::VldPage {
        access: Access::Write,
        page: 2,
        version: 5,
    }))
    .unwrap();
    let e = node.wait_error(Duration::from_secs(20)).expect("no error");
    assert_eq!(reason(&e), "VLD_PAGE for page 2 at version 5, expected 1");
    assert_eq!(node.stats().unchanged_sent, 2);
}

fn ping() -> Vec<u8> {
    msg(Msg::Ping)
}

/// A peer that sends nothing for longer than the peer timeout is lost, within about the
/// timeout; one that sends heartbeats is not, however long it has nothing else to say.
#[test]
fn a_silent_peer_is_lost_and_a_beating_one_is_not() {
    let timeout = Duration::from_millis(200);
    let (node, mut s) = joined_with(move |a| config(a).with_peer_timeout(timeout), PAGES);
    // Heartbeats every 50 ms for 4 timeouts: no error; node 0 beats too.
    let g = geometry();
    let mut reader = s.try_clone().unwrap();
    let pings = std::thread::spawn(move || {
        // Frames until node 0 closes the connection: every one a heartbeat.
        let mut all = Vec::new();
        let _ = reader.read_to_end(&mut all);
        let mut n = 0;
        let mut at = 0;
        while let Ok(Some((m, used))) = decode(&all[at..], &g) {
            assert_eq!(m, Msg::Ping);
            at += used;
            n += 1;
        }
        assert_eq!(at, all.len());
        n
    });
    let t = Instant::now();
    let mut quiet = t;
    while t.elapsed() < 4 * timeout {
        s.write_all(&ping()).unwrap();
        quiet = Instant::now();
        assert_eq!(node.wait_error(Duration::from_millis(50)), None);
    }
    // Then silence (since `quiet`).
    let e = node.wait_error(Duration::from_secs(10)).expect("no error");
    let took = quiet.elapsed();
    assert!(reason(&e).starts_with("silent for "), "{e}");
    assert!(reason(&e).ends_with(" ms (peer timeout 200 ms)"), "{e}");
    assert!(took >= timeout && took < 3 * timeout, "{took:?}");
    // Node 0 sent heartbeats while the fake beat (every quarter timeout), then closed.
    let sent = pings.join().unwrap();
    assert!(sent >= 4, "{sent}");
    let st = node.stats();
    assert_eq!((st.heartbeats_sent, st.peers_lost), (sent, 1));
    assert!(st.heartbeats_received >= 4, "{st}");
    // Heartbeats are counted apart from the protocol's messages and bytes.
    assert_eq!((st.messages_sent, st.messages_received), (0, 0));
    assert_eq!((st.bytes_sent, st.bytes_received), (0, 0));
}

/// A peer that starts a message and then trickles it (so it is never silent) is lost once
/// the message is overdue by the timeout.
#[test]
fn a_peer_that_stalls_mid_message_is_lost() {
    let timeout = Duration::from_millis(200);
    let (node, mut s) = joined_with(move |a| config(a).with_peer_timeout(timeout), PAGES);
    let page = msg(Msg::Page {
        access: Access::Read,
        page: 3,
        version: 4,
        data: Some(vec![1; 4096]),
    });
    let t = Instant::now();
    let mut sent = 0;
    let e = loop {
        s.write_all(&page[sent..=sent]).unwrap();
        sent += 1;
        if let Some(e) = node.wait_error(Duration::from_millis(20)) {
            break e;
        }
        assert!(sent < page.len(), "the whole frame went through");
    };
    assert!(
        reason(&e).starts_with("stalled in the middle of a message ("),
        "{e}"
    );
    assert!(t.elapsed() < 4 * timeout, "{:?}", t.elapsed());
}

/// A peer that asks for pages and never reads the replies makes node 0 queue at most the
/// send limit (beyond what the sockets hold), then it is lost.
#[test]
fn a_peer_that_does_not_read_is_lost_at_the_send_limit() {
    let pages = 8192; // 32 MiB: 16 MiB of replies for the even pages
    let limit = 256 << 10;
    let (node, mut s) = joined_with(
        move |a| config(a).with_versioning(false).with_send_limit(limit),
        pages,
    );
    // Node 0 manages the even pages; without versioning even never-written pages are sent
    // with their (zero) contents. The fake never reads.
    let mut reqs = Vec::new();
    for p in (0..pages).step_by(2) {
        encode(
            &Msg::GetPage {
                access: Access::Read,
                page: p,
                have: 0,
            },
            &mut reqs,
        );
    }
    s.write_all(&reqs).unwrap();
    let e = node.wait_error(Duration::from_secs(60)).expect("no error");
    let r = reason(&e);
    let queued: usize = r
        .strip_prefix("not reading: ")
        .and_then(|r| r.strip_suffix(&format!(" bytes queued for it, over the limit of {limit}")))
        .unwrap_or_else(|| panic!("{e}"))
        .parse()
        .unwrap();
    // One reply at most beyond the limit.
    assert!(queued > limit && queued <= limit + 4096 + 24, "{queued}");
    let st = node.stats();
    assert!(st.pages_sent < pages / 2, "{st}");
    assert_eq!(st.peers_lost, 1);
}

/// A reply to a request node 0 did make, but for another access (an out-of-order reply):
/// the connection is closed and the faulting thread is not served (the node has failed).
#[test]
fn a_wrong_reply_to_a_real_request_fails_the_fault() {
    let (node, mut s) = joined();
    let base = node.region().as_ptr() as usize;
    // Page 1 is managed by node 1 (the fake): a read there asks it.
    let reader = std::thread::spawn(move || {
        // SAFETY: page 1 of node 0's region, which is never unmapped (the node is leaked).
        unsafe { std::ptr::read_volatile((base + 4096) as *const u8) }
    });
    let g = geometry();
    assert_eq!(
        next_msg(&mut s, &g),
        Msg::GetPage {
            access: Access::Read,
            page: 1,
            have: 0
        }
    );
    s.write_all(&msg(Msg::Page {
        access: Access::Write,
        page: 1,
        version: 0,
        data: None,
    }))
    .unwrap();
    let e = node.wait_error(Duration::from_secs(20)).expect("no error");
    assert_eq!(
        reason(&e),
        "PAGE (Write) for page 1 from node 1, which this node did not request"
    );
    assert!(!reader.is_finished());
    // Another fault, on a page node 0 manages, is not served either.
    let before = node.stats().failed_faults;
    let reader2 = std::thread::spawn(move || {
        // SAFETY: page 2 of the region, as above.
        unsafe { std::ptr::read_volatile((base + 2 * 4096) as *const u8) }
    });
    while node.stats().failed_faults == before {
        std::thread::yield_now();
    }
    assert!(!reader2.is_finished());
    assert_eq!(node.stats().peers_lost, 1);
    // The node (and its region) is leaked: dropping it would wake the readers while their
    // mapping goes away. tests/vmm_region.rs shows the drop releasing blocked threads.
    std::mem::forget(node);
}
