//! A peer that breaks the protocol: the node closes that connection with a clear error (and
//! neither panics nor hangs). Node 0 runs in this process; node 1 is a raw socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wv_dsm::proto::{encode, Access, Geometry, Msg, PROTOCOL_VERSION};
use wv_dsm::{Backing, Config, Listener, Node, Region};

const PAGES: u64 = 16;
const BYTES: usize = 16 * 4096;

fn geometry() -> Geometry {
    Geometry {
        nodes: 2,
        page_size: 4096,
        region_size: PAGES * 4096,
    }
}

/// Starts node 0 of a two-node cluster and connects a fake node 1 that sends `init`.
fn start(init: Msg) -> (std::thread::JoinHandle<std::io::Result<Node>>, TcpStream) {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let fake_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let node = std::thread::spawn(move || {
        let mut cfg = Config::new(0, vec![addr, fake_addr]);
        cfg.join_timeout = Duration::from_secs(20);
        Node::join(l, cfg, Region::map(BYTES, Backing::Anonymous)?)
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let mut b = Vec::new();
    encode(&init, &mut b);
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (node, s)
}

fn joined() -> (Node, TcpStream) {
    let (node, mut s) = start(Msg::Init {
        version: PROTOCOL_VERSION,
        node: 1,
        geometry: geometry(),
    });
    let mut reply = [0u8; 32];
    s.read_exact(&mut reply).unwrap();
    (node.join().unwrap().expect("join"), s)
}

/// Sends `bytes` as node 1 and expects node 0 to close the connection with `error`.
fn expect_close(bytes: &[u8], error: &str) {
    let (node, mut s) = joined();
    s.write_all(bytes).unwrap();
    let e = node
        .wait_error(Duration::from_secs(20))
        .expect("no error reported");
    assert_eq!((e.peer, e.message.as_str()), (1, error));
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
    expect_close(&[0, 0, 1, 0], "frame length 65536 outside 4..=4116");
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
    });
    let e = node
        .join()
        .unwrap()
        .err()
        .expect("join must fail")
        .to_string();
    assert!(e.contains("node 1 speaks protocol 9, this node 1"), "{e}");
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
    let mut b = [0u8; 24];
    s.read_exact(&mut b).unwrap();
    let g = geometry();
    let (m, _) = wv_dsm::proto::decode(&b, &g).unwrap().unwrap();
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
    s.read_exact(&mut b).unwrap();
    let (m, _) = wv_dsm::proto::decode(&b, &g).unwrap().unwrap();
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
    assert_eq!(e.message, "VLD_PAGE for page 2 at version 5, expected 1");
    assert_eq!(node.stats().unchanged_sent, 2);
}
