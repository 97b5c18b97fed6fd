//! virtio-net (device type 1) backed by a TAP device: queue 0 receives, queue 1 transmits.
//!
//! Frames carry the 12-byte virtio-net header, which is also the TAP's vnet header, so they
//! pass between the guest's buffers and the TAP without translation. Checksum and
//! segmentation offloads are offered only when the TAP accepts them, and the TAP is told which
//! ones the guest took. Every chain is read from guest memory once ([`crate::chain::Chain`]) and
//! served from that copy. Transmit chains must be device-readable and at most one vnet header
//! plus 64 KiB; receive buffers must be device-writable; anything else is dropped and counted.
#![allow(clippy::cast_possible_truncation)] // lengths are bounded by MAX_FRAME first

use crate::chain::{Chain, MAX_CHAIN};
use crate::device::{CtlAction, DeviceState, ExitGuard, WorkerCtl};
use crate::GuestMemoryMmap;
use crate::F_VERSION_1;
use crate::{ActiveQueue, Interrupt, VirtioDevice};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::{QueueOwnedT, QueueT};

/// The virtio-net header with VERSION_1 (includes num_buffers).
pub const VNET_HDR: usize = 12;
/// Largest frame: header plus a 64 KiB GSO packet plus an Ethernet header.
pub const MAX_FRAME: usize = VNET_HDR + 65_535 + 14;

pub(crate) const F_CSUM: u64 = 1 << 0;
pub(crate) const F_GUEST_CSUM: u64 = 1 << 1;
pub(crate) const F_MAC: u64 = 1 << 5;
pub(crate) const F_GUEST_TSO4: u64 = 1 << 7;
pub(crate) const F_GUEST_TSO6: u64 = 1 << 8;
pub(crate) const F_HOST_TSO4: u64 = 1 << 11;
pub(crate) const F_HOST_TSO6: u64 = 1 << 12;
pub(crate) const F_MRG_RXBUF: u64 = 1 << 15;
pub(crate) const F_STATUS: u64 = 1 << 16;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// TUNSETOFFLOAD: the reader takes partially checksummed frames.
pub const TUN_F_CSUM: libc::c_uint = 1;
/// TUNSETOFFLOAD: the reader takes TCP/IPv4 segments (needs [`TUN_F_CSUM`]).
pub const TUN_F_TSO4: libc::c_uint = 2;
/// TUNSETOFFLOAD: the reader takes TCP/IPv6 segments (needs [`TUN_F_CSUM`]).
pub const TUN_F_TSO6: libc::c_uint = 4;
pub(crate) const QUEUE_SIZE: u16 = 256;

/// A TAP device opened with vnet headers.
pub struct Tap {
    file: File,
    name: String,
    offloads: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The name under which a jailed VMM finds TAP `name` handed over, attached and up
/// (crates/fds).
pub fn tap_key(name: &str) -> String {
    format!("tap:{name}")
}

impl Tap {
    /// Its queue's file, to hand over to a jailed VMM ([`tap_key`]).
    pub fn into_file(self) -> File {
        self.file
    }

    /// Opens (and, with CAP_NET_ADMIN, creates and brings up) TAP `name`.
    pub fn open(name: &str) -> Result<Tap, String> {
        if name.is_empty()
            || name.len() > 15
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        {
            return Err(format!(
                "'{name}' is not a valid interface name (1-15 characters)"
            ));
        }
        // A jailed VMM was handed the TAP attached and up (crates/fds; [`tap_key`]).
        if let Some(fd) = wv_fds::take(&tap_key(name)) {
            return Tap::attached(std::fs::File::from(fd), name, true);
        }
        let existed = std::path::Path::new("/sys/class/net").join(name).exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("cannot open /dev/net/tun for TAP {name}: {e}"))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
            let e = std::io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (creating or attaching a TAP needs CAP_NET_ADMIN, or a persistent TAP owned by this user)"
            } else {
                ""
            };
            return Err(format!("cannot attach to TAP {name}: {e}{hint}"));
        }
        Tap::attached(file, name, existed)
    }

    /// The TAP `name` whose queue `file` is attached to: its vnet header and offloads set up,
    /// and the interface brought up unless it `existed` before.
    fn attached(file: std::fs::File, name: &str, existed: bool) -> Result<Tap, String> {
        let hdr: libc::c_int = VNET_HDR as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } != 0 {
            return Err(format!(
                "TAP {name}: cannot set the vnet header size: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: F_SETFL on our descriptor; the loop reads until EAGAIN.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let tap = Tap {
            offloads: false,
            file,
            name: name.to_string(),
        };
        let offloads = tap
            .set_offloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok();
        let _ = tap.set_offloads(0);
        if !existed {
            tap.bring_up()?;
        }
        Ok(Tap { offloads, ..tap })
    }

    /// Tells the kernel which offloads (`TUN_F_*`) the reader of this TAP takes: frames it
    /// reads may then be partially checksummed or segments to cut, as their vnet header says.
    pub fn set_offloads(&self, flags: libc::c_uint) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } == 0
        {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn bring_up(&self) -> Result<(), String> {
        let name = CString::new(self.name.clone()).map_err(|e| e.to_string())?;
        // SAFETY: a datagram socket used only for the interface-flag ioctls below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(format!(
                "TAP {}: {}",
                self.name,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `s` is ours.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq we own.
        unsafe {
            if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
                return Err(format!(
                    "TAP {}: {}",
                    self.name,
                    std::io::Error::last_os_error()
                ));
            }
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
                return Err(format!(
                    "TAP {}: cannot bring it up: {}",
                    self.name,
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    }

    /// The TAP's descriptor (non-blocking; frames carry a [`VNET_HDR`]-byte vnet header).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the TAP takes checksum and segmentation offloads.
    pub fn offloads(&self) -> bool {
        self.offloads
    }
}

/// What the device counted.
#[derive(Default, Debug)]
pub struct NetCounters {
    /// Frames sent to the TAP.
    pub tx_frames: AtomicU64,
    /// Their bytes (Ethernet frames, without the vnet header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes (Ethernet frames, without the vnet header).
    pub rx_bytes: AtomicU64,
    /// Malformed transmit chains or receive buffers dropped.
    pub dropped: AtomicU64,
}

/// What a network device saves: the MAC address the driver read (restored as it was, since
/// the guest keeps using it). The TAP is the host's and is opened anew.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC address in the configuration space.
    pub mac: [u8; 6],
}

/// The network device.
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    counters: Arc<NetCounters>,
    ctl: Option<Arc<WorkerCtl>>,
    thread: Option<JoinHandle<()>>,
}

impl Net {
    /// A device on `tap` with `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap: Arc::new(tap),
            mac,
            counters: Arc::default(),
            ctl: None,
            thread: None,
        }
    }

    /// What the device counted so far.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

/// Moves one transmit chain to the TAP; false if the chain was malformed.
fn transmit<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    tap: &Tap,
    buf: &mut Vec<u8>,
) -> bool
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    transmit_to(mem, chain, &mut &tap.file, buf)
}

/// Validates one transmit chain (device-readable only, a vnet header, at most [`MAX_FRAME`])
/// and writes the frame to `out`; false if the chain was malformed or the write failed. The
/// chain is read once ([`Chain::read`]) and the frame copied from that copy.
pub fn transmit_to<M, W: Write>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    out: &mut W,
    buf: &mut Vec<u8>,
) -> bool
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    match Chain::read(mem, chain, MAX_CHAIN) {
        Ok(c) => transmit_chain(mem, &c, out, buf),
        Err(_) => false,
    }
}

/// Like [`transmit_to`], from a chain already read and validated.
pub fn transmit_chain<W: Write>(
    mem: &GuestMemoryMmap,
    c: &Chain,
    out: &mut W,
    buf: &mut Vec<u8>,
) -> bool {
    if !c.writable().is_empty() {
        return false;
    }
    let n = c.readable_bytes() as usize;
    if !(VNET_HDR..=MAX_FRAME).contains(&n) {
        return false;
    }
    buf.resize(n, 0);
    if c.read_at(mem, 0, buf).is_err() {
        return false;
    }
    out.write_all(buf).is_ok()
}

/// Delivers `frame` (vnet header included) into the receive queue; true if the frame was
/// delivered or dropped, false if the guest has not posted enough buffers.
pub fn deliver_frame(
    mem: &GuestMemoryMmap,
    q: &mut ActiveQueue,
    frame: &[u8],
    mergeable: bool,
    counters: &NetCounters,
) -> bool {
    deliver_frame_with(mem, q, frame, mergeable, counters, || {})
}

/// [`deliver_frame`], calling `between` after the receive chains were read and before the
/// frame is written into them: fuzzing and tests rewrite the descriptors there, as another
/// vCPU could.
pub fn deliver_frame_with(
    mem: &GuestMemoryMmap,
    q: &mut ActiveQueue,
    frame: &[u8],
    mergeable: bool,
    counters: &NetCounters,
    between: impl FnMut(),
) -> bool {
    let len = frame.len().min(MAX_FRAME);
    let mut rx = Rx {
        frame: frame[..len].to_vec(),
        len,
    };
    deliver(mem, q, &mut rx, mergeable, counters, between)
}

struct Rx {
    frame: Vec<u8>,
    len: usize,
}

/// Delivers the pending frame into receive buffers; true if the frame is done with (delivered
/// or dropped), false if the guest has not posted enough buffers yet (the frame stays pending
/// and no buffer is consumed). Malformed buffers are returned empty and the frame is dropped.
/// Each chain is read once; `between` runs after the reading, before the writing.
fn deliver(
    mem: &GuestMemoryMmap,
    q: &mut ActiveQueue,
    rx: &mut Rx,
    mergeable: bool,
    counters: &NetCounters,
    mut between: impl FnMut(),
) -> bool {
    // A frame must at least carry the vnet header (found by fuzzing: an empty frame used to
    // index an empty buffer list).
    if rx.len < VNET_HDR {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        rx.len = 0;
        return true;
    }
    // (head, the chain if it is made of writable buffers only)
    let mut taken: Vec<(u16, Option<Chain>)> = Vec::new();
    let mut room = 0usize;
    while room < rx.len && (mergeable || taken.is_empty()) {
        let Some(chain) = q.pop_chain(mem) else {
            for _ in &taken {
                q.queue.go_to_previous_position();
            }
            return false;
        };
        let head = chain.head_index();
        let c = Chain::read(mem, chain, MAX_CHAIN)
            .ok()
            .filter(|c| c.readable().is_empty());
        room += c.as_ref().map_or(0, |c| c.writable_bytes() as usize);
        taken.push((head, c));
    }
    between();
    let malformed = taken.iter().any(|(_, c)| c.is_none())
        || room < rx.len
        || taken[0]
            .1
            .as_ref()
            .is_some_and(|c| (c.writable_bytes() as usize) < VNET_HDR);
    if malformed {
        for (head, _) in &taken {
            let _ = q.queue.add_used(mem, *head, 0);
        }
        q.count_bad_chain();
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        rx.len = 0;
        return true;
    }
    if mergeable {
        let n = taken.len() as u16;
        rx.frame[10..12].copy_from_slice(&n.to_le_bytes());
    }
    let mut done = 0usize;
    let mut lens = Vec::with_capacity(taken.len());
    for (head, c) in &taken {
        let c = c.as_ref().expect("checked above");
        let n = (c.writable_bytes() as usize).min(rx.len - done);
        if c.write_at(mem, 0, &rx.frame[done..done + n]).is_err() {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        done += n;
        lens.push((*head, n as u32));
    }
    for (head, n) in lens {
        let _ = q.queue.add_used(mem, head, n);
    }
    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
    counters
        .rx_bytes
        .fetch_add((rx.len - VNET_HDR) as u64, Ordering::Relaxed);
    rx.len = 0;
    true
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        1
    }
    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_MAC | F_STATUS;
        if self.tap.offloads() {
            f |= F_CSUM
                | F_GUEST_CSUM
                | F_HOST_TSO4
                | F_HOST_TSO6
                | F_GUEST_TSO4
                | F_GUEST_TSO6
                | F_MRG_RXBUF;
        }
        f
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
        crate::device::read_config_window(&c, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
        ctl: Arc<WorkerCtl>,
    ) -> Result<(), String> {
        let mut tun = 0;
        if features & F_GUEST_CSUM != 0 {
            tun |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                tun |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                tun |= TUN_F_TSO6;
            }
        }
        self.tap
            .set_offloads(tun)
            .map_err(|e| format!("TAP {}: setting offloads: {e}", self.tap.name))?;
        let mergeable = features & F_MRG_RXBUF != 0;
        let (tap, counters, ctl2) = (self.tap.clone(), self.counters.clone(), ctl.clone());
        let mut queues = queues;
        if queues.len() != 2 {
            return Err("virtio-net needs two queues".into());
        }
        let thread = wv_devices::thread::spawn("virtio-net".into(), "virtio-net", move || {
            let _exit = ExitGuard(ctl2.clone());
            net_loop(
                mem,
                &mut queues,
                &tap,
                mergeable,
                irq.as_ref(),
                &counters,
                &ctl2,
            )
        })
        .map_err(|e| e.to_string())?;
        self.ctl = Some(ctl);
        self.thread = Some(thread);
        Ok(())
    }
    fn reset(&mut self) {
        stop_worker(&mut self.ctl, &mut self.thread);
    }
    fn save_state(&self) -> DeviceState {
        DeviceState::Net(NetState { mac: self.mac })
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        restore_mac(&mut self.mac, state)
    }
    fn io_counters(&self) -> Option<crate::IoCounters> {
        Some(crate::IoCounters::Net(self.counters.clone()))
    }
}

/// Stops a net device's worker (TAP or vhost-user relay) and waits for its thread.
pub(crate) fn stop_worker(ctl: &mut Option<Arc<WorkerCtl>>, thread: &mut Option<JoinHandle<()>>) {
    if let Some(c) = ctl.take() {
        c.stop();
    }
    if let Some(t) = thread.take() {
        let _ = t.join();
    }
}

/// A net device's saved state (its MAC) back into `mac`; any other device's state is refused.
pub(crate) fn restore_mac(mac: &mut [u8; 6], state: DeviceState) -> Result<(), String> {
    match state {
        DeviceState::Net(s) => {
            *mac = s.mac;
            Ok(())
        }
        other => Err(format!(
            "a {} state cannot be restored into a virtio-net device",
            other.kind()
        )),
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Serves both queues and the TAP until stopped; parks (between frames) when `ctl` asks.
fn net_loop(
    mem: GuestMemoryMmap,
    queues: &mut [ActiveQueue],
    tap: &Tap,
    mergeable: bool,
    irq: &dyn Interrupt,
    counters: &NetCounters,
    ctl: &WorkerCtl,
) {
    let fd = |r: RawFd| libc::pollfd {
        fd: r,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut rx = Rx {
        frame: vec![0; MAX_FRAME],
        len: 0,
    };
    let mut txbuf = Vec::with_capacity(MAX_FRAME);
    // A sweep serves the transmit queue without a notification: anything posted before
    // DRIVER_OK, before a snapshot, or while the device was paused.
    let mut sweep = match ctl.check(queues) {
        CtlAction::Stop => return,
        CtlAction::Sweep => true,
    };
    loop {
        // Read from the TAP only when there is no frame waiting for guest buffers.
        let mut fds = [
            fd(queues[0].evt.as_raw_fd()),
            fd(queues[1].evt.as_raw_fd()),
            fd(ctl.fd()),
            fd(tap.file.as_raw_fd()),
        ];
        let n = if rx.len == 0 { 4 } else { 3 };
        let timeout = if sweep { 0 } else { -1 };
        // SAFETY: `fds` is a valid array of at least `n` pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, timeout) } < 0 {
            continue;
        }
        if std::mem::take(&mut sweep) {
            fds[1].revents |= libc::POLLIN;
        }
        if fds[2].revents != 0 {
            match ctl.check(queues) {
                CtlAction::Stop => return,
                CtlAction::Sweep => {
                    sweep = true;
                    continue;
                }
            }
        }
        if fds[1].revents != 0 {
            queues[1].take_notifications();
            let mut used = false;
            while !ctl.pausing() {
                let Some(chain) = queues[1].pop_chain(&mem) else {
                    break;
                };
                let head = chain.head_index();
                if transmit(&mem, chain, tap, &mut txbuf) {
                    counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                    counters.tx_bytes.fetch_add(
                        txbuf.len().saturating_sub(VNET_HDR) as u64,
                        Ordering::Relaxed,
                    );
                } else {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                if queues[1].queue.add_used(&mem, head, 0).is_err() {
                    break;
                }
                used = true;
            }
            if used && queues[1].queue.needs_notification(&mem).unwrap_or(true) {
                irq.queue(1);
            }
        }
        if fds[0].revents != 0 {
            queues[0].take_notifications();
        }
        let mut delivered = false;
        while !ctl.pausing() {
            if rx.len == 0 {
                match (&tap.file).read(&mut rx.frame) {
                    Ok(n) if n >= VNET_HDR => rx.len = n,
                    _ => break,
                }
            }
            if !deliver(&mem, &mut queues[0], &mut rx, mergeable, counters, || {}) {
                break;
            }
            delivered = true;
        }
        if delivered && queues[0].queue.needs_notification(&mem).unwrap_or(true) {
            irq.queue(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn rxq(mem: &GuestMemoryMmap, bufs: &[(u64, u32)]) -> ActiveQueue {
        for (i, &(addr, len)) in bufs.iter().enumerate() {
            let at = 16 * i as u64;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(at + 12)).unwrap(); // device-writable
            mem.write_obj(i as u16, GuestAddress(0x104 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(bufs.len() as u16, GuestAddress(0x102))
            .unwrap();
        crate::testutil::ready_queue()
    }

    #[test]
    fn frames_shorter_than_a_header_are_dropped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut q = rxq(&mem, &[(0x1000, 2048)]);
        let c = NetCounters::default();
        assert!(deliver_frame(&mem, &mut q, &[], false, &c));
        assert!(deliver_frame(&mem, &mut q, &[0; 5], true, &c));
        assert_eq!(c.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn mergeable_frames_span_buffers_and_count_them() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut q = rxq(&mem, &[(0x1000, 1000), (0x2000, 1000)]);
        let c = NetCounters::default();
        let frame: Vec<u8> = (0..1500u32).map(|i| i.to_le_bytes()[0]).collect();
        assert!(deliver_frame(&mem, &mut q, &frame, true, &c));
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(
            c.rx_bytes.load(Ordering::Relaxed),
            (1500 - VNET_HDR) as u64,
            "the frame's bytes, without the vnet header"
        );
        let nb: u16 = mem.read_obj(GuestAddress(0x1000 + 10)).unwrap();
        assert_eq!(nb, 2, "num_buffers");
        let tail: u8 = mem.read_obj(GuestAddress(0x2000 + 499)).unwrap();
        assert_eq!(tail, frame[1499]);
        // Without mergeable buffers the same frame does not fit one 1000-byte buffer: dropped.
        let mut q = rxq(&mem, &[(0x1000, 1000)]);
        assert!(deliver_frame(&mem, &mut q, &frame, false, &c));
        assert_eq!(c.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(c.rx_bytes.load(Ordering::Relaxed), (1500 - VNET_HDR) as u64);
        // No buffers posted yet: the frame waits.
        let mut q = rxq(&mem, &[]);
        assert!(!deliver_frame(&mem, &mut q, &frame, true, &c));
    }

    #[test]
    fn receive_buffers_are_written_as_they_were_read() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let c = NetCounters::default();
        let frame: Vec<u8> = (0..80u8).collect();
        // The guest moves and shrinks the buffer after the device read the chain: the frame
        // still goes where the descriptor pointed when it was read, and nowhere else.
        let mut q = rxq(&mem, &[(0x1000, 100)]);
        let rewrite = || {
            mem.write_obj(0x5000u64, GuestAddress(0)).unwrap();
            mem.write_obj(8u32, GuestAddress(8)).unwrap();
        };
        assert!(deliver_frame_with(&mem, &mut q, &frame, false, &c, rewrite));
        let mut got = [0u8; 80];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got[..], &frame[..]);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x180 + 8)).unwrap(), 80);
        // A buffer too small when read stays too small, however large the guest makes it.
        let frame = vec![7u8; 1000];
        let mut q = rxq(&mem, &[(0x2000, 100)]);
        let grow = || mem.write_obj(60_000u32, GuestAddress(8)).unwrap();
        assert!(deliver_frame_with(&mem, &mut q, &frame, false, &c, grow));
        assert_eq!(c.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
    }

    #[test]
    fn transmit_sends_the_chain_as_it_was_read() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut q = rxq(&mem, &[(0x1000, 100)]);
        mem.write_obj(0u16, GuestAddress(12)).unwrap(); // device-readable
        mem.write_slice(&[0x42; 100], GuestAddress(0x1000)).unwrap();
        let chain = q.queue.pop_descriptor_chain(&mem).unwrap();
        let c = Chain::read(&mem, chain, MAX_CHAIN).unwrap();
        // Made writable and larger than a frame after the reading: changes nothing.
        mem.write_obj(2u16, GuestAddress(12)).unwrap();
        mem.write_obj(200_000u32, GuestAddress(8)).unwrap();
        let (mut out, mut buf) = (Vec::new(), Vec::new());
        assert!(transmit_chain(&mem, &c, &mut out, &mut buf));
        assert_eq!(out, vec![0x42; 100]);
    }

    #[test]
    fn a_racing_guest_cannot_stretch_a_transmit_frame() {
        use std::sync::atomic::AtomicBool;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0x42; 100], GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x1000u64, GuestAddress(0)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let guard = crate::testutil::StopOnDrop(stop.clone());
        // Another vCPU flips the only descriptor between a 100-byte readable frame and a
        // writable buffer longer than any frame.
        let flipper = {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    mem.write_obj(200_000u32, GuestAddress(8)).unwrap();
                    mem.write_obj(2u16, GuestAddress(12)).unwrap();
                    mem.write_obj(100u32, GuestAddress(8)).unwrap();
                    mem.write_obj(0u16, GuestAddress(12)).unwrap();
                }
            })
        };
        let (mut sent, mut refused) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while sent + refused < 20_000 || sent == 0 || refused == 0 {
            if std::time::Instant::now() > deadline {
                panic!("the descriptor never changed within 60 s ({sent} sent)");
            }
            let mut q = rxq(&mem, &[]);
            mem.write_obj(0u16, GuestAddress(0x104)).unwrap();
            mem.write_obj(1u16, GuestAddress(0x102)).unwrap();
            let chain = q.queue.pop_descriptor_chain(&mem).unwrap();
            let (mut out, mut buf) = (Vec::new(), Vec::new());
            if transmit_to(&mem, chain, &mut out, &mut buf) {
                assert_eq!(out, vec![0x42; 100], "a frame other than the one read");
                sent += 1;
            } else {
                assert!(out.is_empty());
                refused += 1;
            }
        }
        drop(guard);
        flipper.join().unwrap();
    }

    #[test]
    #[ignore = "needs root for a network namespace and a TAP: cargo test -- --include-ignored"]
    fn a_paused_net_worker_transmits_nothing_until_resumed() {
        use crate::testutil::{readable, EvtIrq, DEADLINE};
        // The TAP lives in a network namespace of this thread's own.
        let t = std::thread::spawn(|| {
            // SAFETY: unshare affects only the calling thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "unshare(CLONE_NEWNET): {} (this test needs root)",
                    std::io::Error::last_os_error()
                );
            }
            let mut net = Net::new(Tap::open("wvt0").unwrap(), [2, 0, 0, 0, 0, 1]);
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            // Receive queue at 0x1_0000.. with no buffers; transmit queue: the test layout.
            let mut rq = virtio_queue::Queue::new(16).unwrap();
            rq.try_set_desc_table_address(GuestAddress(0x1_0000))
                .unwrap();
            rq.try_set_avail_ring_address(GuestAddress(0x1_1000))
                .unwrap();
            rq.try_set_used_ring_address(GuestAddress(0x1_2000))
                .unwrap();
            rq.set_ready(true);
            let rx = ActiveQueue {
                queue: rq,
                evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                counters: Default::default(),
            };
            let mut tx = crate::testutil::ready_queue();
            // The worker reads notifications without blocking, as from the VMM's eventfds.
            tx.evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let notify = tx.evt.try_clone().unwrap();
            // Transmit chain k: descriptor k, a vnet header and a 60-byte frame at 0x8000.
            let post = |k: u16| {
                let at = 16 * u64::from(k);
                mem.write_obj(0x8000u64, GuestAddress(at)).unwrap();
                mem.write_obj(72u32, GuestAddress(at + 8)).unwrap();
                mem.write_obj(0u16, GuestAddress(at + 12)).unwrap();
                mem.write_obj(k, GuestAddress(0x104 + 2 * at / 16)).unwrap();
                mem.write_obj(k + 1, GuestAddress(0x102)).unwrap();
            };
            let used = || mem.read_obj::<u16>(GuestAddress(0x182)).unwrap();
            let irq_evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            let irq = Arc::new(EvtIrq(irq_evt.try_clone().unwrap()));
            let wait_used = |n: u16| {
                let end = std::time::Instant::now() + DEADLINE;
                while used() < n {
                    assert!(
                        std::time::Instant::now() < end,
                        "transmit used index {}",
                        used()
                    );
                    let mut p = libc::pollfd {
                        fd: irq_evt.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 100) };
                    if p.revents != 0 {
                        let _ = irq_evt.read();
                    }
                }
            };
            post(0);
            let ctl = WorkerCtl::new(false).unwrap();
            net.activate(mem.clone(), F_VERSION_1, vec![rx, tx], irq, ctl.clone())
                .unwrap();
            wait_used(1);
            ctl.pause();
            assert!(ctl.is_paused());
            post(1);
            notify.write(1).unwrap();
            assert!(readable(&notify), "the notification waits in its eventfd");
            assert_eq!(used(), 1, "nothing transmitted while paused");
            let q = ctl.parked_queues().unwrap();
            assert_eq!((q[1].next_avail, q[1].next_used), (1, 1));
            ctl.resume();
            wait_used(2);
            assert_eq!(
                net.counters().tx_frames.load(Ordering::Relaxed)
                    + net.counters().dropped.load(Ordering::Relaxed),
                2
            );
            assert_eq!(
                net.counters().tx_bytes.load(Ordering::Relaxed),
                60 * net.counters().tx_frames.load(Ordering::Relaxed),
                "each frame sent counts its 60 bytes, not the vnet header"
            );
            net.reset();
        });
        t.join().unwrap();
    }
}
