//! The DSM node protocol (`wv_dsm::proto::decode` and `wv_dsm::Engine::handle`): the input
//! is a stream of frames as one peer would send them, each preceded by a control byte naming
//! the sending node (or, with the high bit set, a local fault on a page instead of a frame;
//! 0x7f: the connection to a peer is lost; 0x7e: the deferred work and the mirror push run).
//! The first byte also picks the node count, the read-ahead (0-3 pages), whether versioning
//! is on and whether the node mirrors (then MIRROR, CLAIM and LOST are handled and a lost
//! peer starts a recovery). Heartbeats (PING) are frames too.
//! Every frame must decode to a message that re-encodes to the same bytes, or be refused;
//! every decoded message is handed to node 0's coherence engine over a fake memory, which
//! must accept it or refuse it with an error, never panic; the engine's messages to itself
//! are delivered too.
#![no_main]

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use wv_dsm::proto::{decode, encode, Geometry};
use wv_dsm::{Engine, PageOps, Stats};

const PS: u32 = 512;
const PAGES: u64 = 8;

struct Fake(Vec<Option<Vec<u8>>>);

impl PageOps for Fake {
    fn install(&mut self, page: u64, data: &[u8], _wp: bool) -> io::Result<()> {
        assert_eq!(data.len(), PS as usize);
        let slot = &mut self.0[page as usize];
        assert!(slot.is_none(), "install over a mapped page");
        *slot = Some(data.to_vec());
        Ok(())
    }
    fn protect(&mut self, page: u64) -> io::Result<()> {
        assert!(
            self.0[page as usize].is_some(),
            "protect of an unmapped page"
        );
        Ok(())
    }
    fn unprotect(&mut self, page: u64) -> io::Result<()> {
        assert!(
            self.0[page as usize].is_some(),
            "unprotect of an unmapped page"
        );
        Ok(())
    }
    fn drop_page(&mut self, page: u64) -> io::Result<()> {
        self.0[page as usize] = None;
        Ok(())
    }
    fn read(&mut self, page: u64, out: &mut [u8]) {
        out.copy_from_slice(
            self.0[page as usize]
                .as_ref()
                .expect("read of an unmapped page"),
        );
    }
    fn wake(&mut self, _page: u64) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let nodes = u32::from(n % 4) + 1;
    let g = Geometry {
        nodes,
        page_size: PS,
        region_size: PAGES * u64::from(PS),
    };
    let mem = Fake(vec![None; PAGES as usize]);
    let mut eng = Engine::new(
        0,
        nodes,
        PS as usize,
        PAGES,
        mem,
        Duration::ZERO,
        Arc::new(Stats::default()),
    );
    eng.set_read_ahead(u32::from(n >> 2) % 4);
    eng.set_versioning(n & 0x40 == 0);
    if n & 0x20 != 0 {
        // Mirroring (MIRROR, CLAIM, LOST; recovery on a lost peer; the periodic push).
        eng.set_mirror(Duration::from_millis(1));
    }
    let now = Instant::now();
    while let Some((&ctl, r)) = rest.split_first() {
        rest = r;
        if ctl == 0x7f {
            eng.peer_lost(1 % nodes);
        } else if ctl == 0x7e {
            let _ = eng.run_due(now + Duration::from_secs(1));
        } else if ctl & 0x80 != 0 {
            let _ = eng.fault(u64::from(ctl & 0x7f) % PAGES, ctl & 0x40 != 0);
        } else {
            let from = u32::from(ctl) % nodes;
            match decode(rest, &g) {
                Ok(Some((msg, used))) => {
                    let mut again = Vec::new();
                    encode(&msg, &mut again);
                    assert_eq!(again, rest[..used], "re-encoding differs");
                    rest = &rest[used..];
                    if from != 0 {
                        let _ = eng.handle(from, msg, now);
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
        // Deliver what node 0 sends itself; drop what goes elsewhere.
        let mut budget = 64;
        while let Some((to, m)) = eng.next_out() {
            if to == 0 && budget > 0 {
                budget -= 1;
                let _ = eng.handle(0, m, now);
            }
        }
    }
});
