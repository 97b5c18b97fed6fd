//! The VMM hand-over: a mapping made by the caller (as a VMM maps guest RAM) given to a node
//! with `Region::from_raw`, and accessed both by threads and by the kernel on the process's
//! behalf (here `read(2)`/`write(2)` on a pipe, as KVM and vhost access guest memory): kernel
//! accesses fault through the same protocol. Two nodes in one process, each with its mapping.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use wv_dsm::{Backing, Config, Listener, Node, Region};

const BYTES: usize = 64 * 4096;

fn vmm_mapping() -> *mut u8 {
    // SAFETY: a fresh anonymous mapping; the test never unmaps it (it lives until exit).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (r.into(), w.into())
}

#[test]
fn caller_mapping_is_coherent_for_threads_and_kernel_accesses() {
    let (l0, l1) = (
        Listener::bind("127.0.0.1:0").unwrap(),
        Listener::bind("127.0.0.1:0").unwrap(),
    );
    let peers = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let (m0, m1) = (vmm_mapping() as usize, vmm_mapping() as usize);
    let p0 = peers.clone();
    let n0 = std::thread::spawn(move || {
        // SAFETY: the mapping above, never unmapped.
        let r = unsafe { Region::from_raw(m0 as *mut u8, BYTES, Backing::Anonymous) };
        Node::join(l0, Config::new(0, p0), r).unwrap()
    });
    // SAFETY: as above.
    let r1 = unsafe { Region::from_raw(m1 as *mut u8, BYTES, Backing::Anonymous) };
    let n1 = Node::join(l1, Config::new(1, peers), r1).unwrap();
    let n0 = n0.join().unwrap();

    // The kernel writes page 5 on node 0 (a write fault taken inside read(2)).
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = pipe();
    w.write_all(&page).unwrap();
    // SAFETY: reads into node 0's mapping, page 5 (inside it).
    let n = unsafe { libc::read(r.as_raw_fd(), (m0 + 5 * 4096) as *mut libc::c_void, 4096) };
    assert_eq!(n, 4096);

    // The kernel reads it on node 1 (a read fault taken inside write(2)).
    // SAFETY: writes from node 1's mapping, page 5 (inside it).
    let n = unsafe { libc::write(w.as_raw_fd(), (m1 + 5 * 4096) as *const libc::c_void, 4096) };
    assert_eq!(n, 4096);
    let mut back = vec![0u8; 4096];
    r.read_exact(&mut back).unwrap();
    assert_eq!(back, page);

    // A thread on node 1 writes; node 0's copy is invalidated and the new value read there.
    // SAFETY: aligned words inside the mappings, accessed atomically.
    let (w1, w0) = unsafe {
        (
            &*((m1 + 5 * 4096) as *const AtomicU64),
            &*((m0 + 5 * 4096) as *const AtomicU64),
        )
    };
    std::thread::scope(|s| {
        s.spawn(|| w1.store(0x1234, Ordering::Release));
    });
    assert_eq!(w0.load(Ordering::Acquire), 0x1234);
    assert_eq!(n1.stats().pages_received, 1);
    assert_eq!(n0.stats().pages_received, 1);
    assert!(n0.errors().is_empty() && n1.errors().is_empty());
    // Stop both engines before the mappings could be touched again.
    drop(n1);
    drop(n0);
}

/// A node that loses its peer leaves a thread faulting on the peer's page blocked (it never
/// sees made-up contents); shutting the node down (or dropping it), as a stopping VMM does,
/// releases the thread (the region is then plain memory: the page reads as zero).
#[test]
fn a_lost_peer_blocks_faults_until_the_node_is_dropped() {
    let (l0, l1) = (
        Listener::bind("127.0.0.1:0").unwrap(),
        Listener::bind("127.0.0.1:0").unwrap(),
    );
    let peers = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let (m0, m1) = (vmm_mapping() as usize, vmm_mapping() as usize);
    let p0 = peers.clone();
    let n0 = std::thread::spawn(move || {
        // SAFETY: the mapping above, never unmapped.
        let r = unsafe { Region::from_raw(m0 as *mut u8, BYTES, Backing::Anonymous) };
        Node::join(l0, Config::new(0, p0), r).unwrap()
    });
    // SAFETY: as above.
    let r1 = unsafe { Region::from_raw(m1 as *mut u8, BYTES, Backing::Anonymous) };
    let n1 = Node::join(l1, Config::new(1, peers.clone()), r1).unwrap();
    let n0 = n0.join().unwrap();
    // Node 1 writes page 7 (it owns it from then on), then goes away.
    // SAFETY: an aligned word inside node 1's mapping.
    let w1 = unsafe { &*((m1 + 7 * 4096) as *const AtomicU64) };
    std::thread::scope(|s| {
        s.spawn(|| w1.store(99, Ordering::Release));
    });
    drop(n1);
    let e = n0
        .wait_error(std::time::Duration::from_secs(5))
        .expect("no error");
    assert_eq!(e.peer, 1);
    assert_eq!(e.message, format!("{}: closed the connection", peers[1]));
    assert_eq!(n0.failed(), Some(e));
    let reader = std::thread::spawn(move || {
        // SAFETY: an aligned word inside node 0's mapping, which is never unmapped.
        unsafe { &*((m0 + 7 * 4096) as *const AtomicU64) }.load(Ordering::Acquire)
    });
    while n0.stats().failed_faults == 0 {
        std::thread::yield_now();
    }
    assert!(!reader.is_finished());
    n0.shutdown();
    assert_eq!(reader.join().unwrap(), 0);
    // The error is still there; a second shutdown (the drop's) does nothing.
    assert_eq!(n0.errors().len(), 1);
    n0.shutdown();
    drop(n0);
}
