//! A virtio-net frontend played on the host over vhost-user (no guest): memfd memory, a receive
//! queue (0) and a transmit queue (1) at fixed places, each descriptor with a buffer of its own.
//! Shared by the switch tests (tests/vswitch.rs) and the switch bench (benches/vswitch.rs),
//! both of which include this file by path (`#[path]`); it depends on nothing of `common`.
#![allow(dead_code)] // each includer uses part of it

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

/// The vnet header's size with VERSION_1 (with `num_buffers`).
pub const HDR: usize = 12;
/// Entries per ring unless asked for more.
pub const NQ: u16 = 64;
/// Feature bits the player may ask for.
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_MRG_RXBUF: u64 = 1 << 15;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
/// Where the buffers start (the rings are below).
const BUF: u64 = 1 << 20;

/// Queue q's rings: descriptors, avail, used (room for 256 entries each).
const fn ring(q: u64) -> (u64, u64, u64) {
    (q * 0x4000, q * 0x4000 + 0x1000, q * 0x4000 + 0x3000)
}

/// One frontend.
pub struct NetPlayer {
    _f: vhost::vhost_user::Frontend,
    /// Its memory, as the switch maps it too.
    pub mem: wv_virtio::GuestMemoryMmap,
    _file: std::fs::File,
    /// Queue kicks (to the switch) and calls (from it).
    pub kick: [vmm_sys_util::eventfd::EventFd; 2],
    pub call: [vmm_sys_util::eventfd::EventFd; 2],
    avail: [u16; 2],
    seen: [u16; 2],
    /// Entries per ring.
    pub nq: u16,
    /// Bytes of buffer per descriptor.
    pub stride: u64,
    /// What the backend offered, and what was acked.
    pub offered: u64,
    pub acked: u64,
}

impl NetPlayer {
    /// [`NQ`]-entry rings, 2 KiB buffers, no offloads or mergeable buffers (one buffer a
    /// frame).
    pub fn connect(sock: &Path) -> NetPlayer {
        NetPlayer::connect_with(sock, NQ, 2048, 0)
    }

    /// Rings of `nq` entries (at most 256), `stride` bytes of buffer per descriptor, and of
    /// the features in `want` those the backend offers acked (with VERSION_1 and
    /// PROTOCOL_FEATURES).
    pub fn connect_with(sock: &Path, nq: u16, stride: u64, want: u64) -> NetPlayer {
        use std::os::fd::{AsRawFd, FromRawFd};
        use vhost::vhost_user::{Frontend, VhostUserFrontend};
        use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
        use vm_memory::mmap::MmapRegionBuilder;
        assert!(nq.is_power_of_two() && nq <= 256, "ring size {nq}");
        let nmem = (BUF + 2 * u64::from(nq) * stride).next_multiple_of(4096);
        // SAFETY: memfd_create reads a NUL-terminated name; the descriptor is new.
        let fd = unsafe { libc::memfd_create(c"wv-net".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(nmem).unwrap();
        let mut f = Frontend::from_stream(UnixStream::connect(sock).unwrap(), 2);
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        f.get_protocol_features().unwrap();
        f.set_protocol_features(vhost::vhost_user::message::VhostUserProtocolFeatures::empty())
            .unwrap();
        let acked = offered & (F_VERSION_1 | F_PROTOCOL_FEATURES | want);
        f.set_features(acked).unwrap();
        let region =
            MmapRegionBuilder::new_with_bitmap(usize::try_from(nmem).unwrap(), Default::default())
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .with_file_offset(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0))
                .build()
                .unwrap();
        let mem = wv_virtio::GuestMemoryMmap::from_regions(vec![vm_memory::GuestRegionMmap::new(
            region,
            GuestAddress(0),
        )
        .unwrap()])
        .unwrap();
        use vm_memory::GuestMemoryBackend;
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        f.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: nmem,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();
        let ev = || vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let (kick, call) = ([ev(), ev()], [ev(), ev()]);
        for q in 0..2usize {
            let (d, a, u) = ring(q as u64);
            f.set_vring_num(q, nq).unwrap();
            f.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: nq,
                    queue_size: nq,
                    flags: 0,
                    desc_table_addr: host + d,
                    used_ring_addr: host + u,
                    avail_ring_addr: host + a,
                    log_addr: None,
                },
            )
            .unwrap();
            f.set_vring_base(q, 0).unwrap();
            f.set_vring_call(q, &call[q]).unwrap();
            f.set_vring_kick(q, &kick[q]).unwrap();
            f.set_vring_enable(q, true).unwrap();
        }
        NetPlayer {
            _f: f,
            mem,
            _file: file,
            kick,
            call,
            avail: [0; 2],
            seen: [0; 2],
            nq,
            stride,
            offered,
            acked,
        }
    }

    /// Where descriptor `i` of queue `q` has its buffer.
    pub fn buf(&self, q: usize, i: u16) -> u64 {
        BUF + (q as u64 * u64::from(self.nq) + u64::from(i)) * self.stride
    }

    /// Descriptor `i` of queue `q`: its buffer, `len` bytes, writable for the receive queue.
    pub fn desc(&self, q: usize, i: u16, len: u32) {
        let at = ring(q as u64).0 + 16 * u64::from(i);
        self.mem
            .write_obj(self.buf(q, i), GuestAddress(at))
            .unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        let flags: u16 = if q == 0 { 2 } else { 0 };
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(at + 14)).unwrap();
    }

    /// Makes chain `head` of queue `q` available (no kick).
    pub fn offer(&mut self, q: usize, head: u16) {
        let a = ring(q as u64).1;
        let slot = u64::from(self.avail[q] % self.nq);
        self.mem
            .write_obj(head, GuestAddress(a + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(a + 2))
            .unwrap();
    }

    /// Kicks queue `q` unless the backend said it need not be (VRING_USED_F_NO_NOTIFY in the
    /// used ring's flags, as a driver honours it: the backend is draining the ring and looks
    /// at it once more before asking for kicks again); whether it kicked.
    pub fn kick_if_needed(&self, q: usize) -> bool {
        // The avail index written before the flags are read (the backend does the converse).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags: u16 = self.mem.read_obj(GuestAddress(ring(q as u64).2)).unwrap();
        if flags & 1 != 0 {
            return false;
        }
        self.kick[q].write(1).unwrap();
        true
    }

    /// Waits for queue `q`'s call (at most 30 s, asserted); the heads used since the last
    /// time. False, with nothing waited for, once `stop` is set (the switch may be gone).
    pub fn used(&mut self, q: usize, out: &mut Vec<(u16, u32)>, stop: &AtomicBool) -> bool {
        let t = std::time::Instant::now();
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            if self.used_within(q, out, Duration::from_millis(100)) {
                return true;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "queue {q} was called within 30 s"
            );
        }
    }

    /// The heads of queue `q` used since the last time, waiting for its call at most
    /// `within`; false if none came.
    pub fn used_within(&mut self, q: usize, out: &mut Vec<(u16, u32)>, within: Duration) -> bool {
        use std::os::fd::AsRawFd;
        out.clear();
        self.collect(q, out);
        if !out.is_empty() {
            return true;
        }
        let mut pfd = libc::pollfd {
            fd: self.call[q].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
            return false;
        }
        self.call[q].read().unwrap();
        self.collect(q, out);
        true
    }

    fn collect(&mut self, q: usize, out: &mut Vec<(u16, u32)>) {
        let u = ring(q as u64).2;
        let used: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
        while self.seen[q] != used {
            let at = u + 4 + 8 * u64::from(self.seen[q] % self.nq);
            let head: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u16::try_from(head).unwrap(), len));
            self.seen[q] = self.seen[q].wrapping_add(1);
        }
    }
}
