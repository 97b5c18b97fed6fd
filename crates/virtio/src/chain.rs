//! A descriptor chain read once from guest memory into a bounded local list, validated, and
//! the only thing a device serves a request from.
//!
//! The descriptor table lies in guest memory, and another vCPU can rewrite it while a device
//! works on a chain. A device that walks the chain twice (once to check lengths, once to move
//! data) can be made to move more than it checked: a disk written past its end, a buffer as
//! large as a guest descriptor allocated. So every device reads a chain exactly once, with
//! [`Chain::read`]: each descriptor is copied into a local list (at most [`MAX_CHAIN`]
//! entries, fewer if the device asks), every buffer is checked to lie inside guest RAM, readable
//! buffers must precede writable ones, and the totals must fit the used ring's `u32`. Guest RAM
//! itself does not change shape while a device runs (the memory map is fixed for the life of
//! the VM), so an address range checked here stays valid; only the descriptors could change,
//! and they are never read again. Buffer *contents* can still change at any time, so devices
//! copy what they need to decide on (headers) into local variables once, too.
#![allow(clippy::cast_possible_truncation)] // lengths are bounded by the u32 totals first

use crate::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Most descriptors a chain may have (the largest queue any device here offers; only an
/// indirect table could hold more, and such a chain is refused).
pub const MAX_CHAIN: usize = 256;

/// One descriptor as it was read: a guest buffer and its direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub write: bool,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// More descriptors than the device accepts.
    TooLong,
    /// A buffer lies (partly) outside guest RAM.
    OutsideMemory,
    /// A device-readable buffer follows a device-writable one.
    Order,
    /// The readable or writable bytes add up to more than a `u32`.
    TooBig,
    /// A copy asked for bytes beyond the chain's readable or writable part.
    Short,
    /// The chain ends where it must not: no descriptor at all, or a last descriptor that
    /// still names a next one (a loop, a next index beyond the queue, an unreadable or nested
    /// indirect table; the descriptor walk stops at those without saying why).
    Broken,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainError::TooLong => "descriptor chain longer than the device accepts",
            ChainError::OutsideMemory => "descriptor buffer outside guest memory",
            ChainError::Order => "device-readable buffer after a device-writable one",
            ChainError::TooBig => "descriptor chain longer than 4 GiB",
            ChainError::Short => "descriptor chain shorter than the request",
            ChainError::Broken => {
                "descriptor chain broken (empty, a loop, a next index beyond the queue, a nested indirect table)"
            }
        })
    }
}

impl std::error::Error for ChainError {}

/// A chain read once and validated.
#[derive(Clone, Debug)]
pub struct Chain {
    head: u16,
    /// Readable descriptors first; never more than the `max` given to `read`.
    descs: Vec<Desc>,
    readable: usize,
    readable_bytes: u32,
    writable_bytes: u32,
}

impl Chain {
    /// Reads `chain` from guest memory, one descriptor at a time and each exactly once, and
    /// validates it; `max` (at most [`MAX_CHAIN`]) is the most descriptors the device accepts.
    pub fn read<M>(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        max: usize,
    ) -> Result<Chain, ChainError>
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        let max = max.min(MAX_CHAIN);
        let mut c = Chain {
            head: chain.head_index(),
            // Most requests have a header, a data buffer and a status.
            descs: Vec::with_capacity(max.min(4)),
            readable: 0,
            readable_bytes: 0,
            writable_bytes: 0,
        };
        let (mut readable, mut writable) = (0u64, 0u64);
        // Whether the last descriptor read names a next one: the walk ended early then.
        let mut dangling = false;
        // `chain` is consumed here: this loop is the only reading of the descriptor table.
        for d in chain {
            dangling = d.has_next();
            if c.descs.len() == max {
                return Err(ChainError::TooLong);
            }
            let desc = Desc {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            };
            if desc.len > 0 && !mem.check_range(GuestAddress(desc.addr), desc.len as usize) {
                return Err(ChainError::OutsideMemory);
            }
            if desc.write {
                writable += u64::from(desc.len);
            } else if c.readable < c.descs.len() {
                return Err(ChainError::Order);
            } else {
                readable += u64::from(desc.len);
                c.readable += 1;
            }
            c.descs.push(desc);
        }
        if c.descs.is_empty() || dangling {
            return Err(ChainError::Broken);
        }
        c.readable_bytes = u32::try_from(readable).map_err(|_| ChainError::TooBig)?;
        c.writable_bytes = u32::try_from(writable).map_err(|_| ChainError::TooBig)?;
        Ok(c)
    }

    /// The index of the chain's head (for the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Every descriptor, readable ones first.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// The device-readable descriptors.
    pub fn readable(&self) -> &[Desc] {
        &self.descs[..self.readable]
    }

    /// The device-writable descriptors.
    pub fn writable(&self) -> &[Desc] {
        &self.descs[self.readable..]
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_bytes(&self) -> u32 {
        self.readable_bytes
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_bytes(&self) -> u32 {
        self.writable_bytes
    }

    /// The guest pieces `(address, length)` covering bytes `offset..offset + len` of the
    /// readable (`write` false) or writable part, in order; refused if the part is shorter.
    pub fn pieces(
        &self,
        write: bool,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, usize)>, ChainError> {
        let mut out = Vec::new();
        self.each_piece(write, offset, len, |addr, n| {
            out.push((addr, n));
            Ok(())
        })?;
        Ok(out)
    }

    /// Copies bytes `offset..offset + buf.len()` of the readable part into `buf`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        self.read_part(false, mem, offset, buf)
    }

    /// Copies bytes `offset..offset + buf.len()` of the writable part into `buf`: what the
    /// device wrote there (the VMM watching an interposed backend's completions).
    pub fn read_writable(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        self.read_part(true, mem, offset, buf)
    }

    /// Copies bytes `offset..` of the `writable` (or readable) part into `buf`.
    fn read_part(
        &self,
        writable: bool,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.each_piece(writable, offset, buf.len() as u64, |addr, n| {
            mem.read_slice(&mut buf[done..done + n], GuestAddress(addr))
                .map_err(|_| ChainError::OutsideMemory)?;
            done += n;
            Ok(())
        })
    }

    /// Copies `data` into bytes `offset..offset + data.len()` of the writable part.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.each_piece(true, offset, data.len() as u64, |addr, n| {
            mem.write_slice(&data[done..done + n], GuestAddress(addr))
                .map_err(|_| ChainError::OutsideMemory)?;
            done += n;
            Ok(())
        })
    }

    fn each_piece(
        &self,
        write: bool,
        mut offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let (descs, total) = if write {
            (self.writable(), self.writable_bytes)
        } else {
            (self.readable(), self.readable_bytes)
        };
        match offset.checked_add(len) {
            Some(end) if end <= u64::from(total) => {}
            _ => return Err(ChainError::Short),
        }
        let mut left = len;
        for d in descs {
            if left == 0 {
                break;
            }
            let dlen = u64::from(d.len);
            if offset >= dlen {
                offset -= dlen;
                continue;
            }
            let n = (dlen - offset).min(left);
            // Inside a buffer checked to lie in guest RAM, so the sum cannot overflow.
            f(d.addr + offset, n as usize)?;
            left -= n;
            offset = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};

    const N: u16 = 1;
    const W: u16 = 2;

    fn setup(descs: &[(u64, u32, u16, u16)]) -> (GuestMemoryMmap, Queue) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = 0x1000 + 16 * i as u64;
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        m.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        m.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        q.set_ready(true);
        (m, q)
    }

    fn read(descs: &[(u64, u32, u16, u16)], max: usize) -> Result<Chain, ChainError> {
        let (m, mut q) = setup(descs);
        let chain = q.pop_descriptor_chain(&m).unwrap();
        Chain::read(&m, chain, max)
    }

    #[test]
    fn a_chain_is_copied_with_its_totals() {
        let c = read(
            &[(0x8000, 16, N, 1), (0xa000, 100, N, 2), (0x9000, 7, W, 0)],
            8,
        )
        .unwrap();
        assert_eq!(c.head(), 0);
        assert_eq!(c.readable().len(), 2);
        assert_eq!(
            c.writable(),
            &[Desc {
                addr: 0x9000,
                len: 7,
                write: true
            }]
        );
        assert_eq!((c.readable_bytes(), c.writable_bytes()), (116, 7));
        assert_eq!(
            c.pieces(false, 10, 20).unwrap(),
            vec![(0x800a, 6), (0xa000, 14)]
        );
        assert_eq!(c.pieces(false, 0, 117), Err(ChainError::Short));
        assert_eq!(c.pieces(true, u64::MAX, 2), Err(ChainError::Short));
    }

    #[test]
    fn bad_chains_are_refused() {
        // Readable after writable.
        let e = read(&[(0x9000, 1, W | N, 1), (0x8000, 16, 0, 0)], 8);
        assert_eq!(e.unwrap_err(), ChainError::Order);
        // Outside RAM (1 MiB), even by one byte.
        let e = read(&[(0x8000, 16, N, 1), ((1 << 20) - 511, 512, 0, 0)], 8);
        assert_eq!(e.unwrap_err(), ChainError::OutsideMemory);
        // More descriptors than the device accepts.
        let e = read(
            &[(0x8000, 16, N, 1), (0x8000, 16, N, 2), (0x9000, 1, W, 0)],
            2,
        );
        assert_eq!(e.unwrap_err(), ChainError::TooLong);
    }

    /// Found by the adversarial probe guest (`probe.attack=ring-loop`): the descriptor walk
    /// of virtio-queue ends quietly at a loop (after a queue's worth of descriptors), at a
    /// next index beyond the queue and at a nested indirect table, and the truncated chain
    /// used to be served (entropy written over the same buffer again and again).
    #[test]
    fn loops_and_chains_that_end_early_are_refused() {
        const I: u16 = 4;
        // Loops: onto itself, between two descriptors, around eight.
        let e = read(&[(0x9000, 64, W | N, 0)], MAX_CHAIN);
        assert_eq!(e.unwrap_err(), ChainError::Broken);
        let e = read(&[(0x9000, 64, W | N, 1), (0xa000, 64, W | N, 0)], MAX_CHAIN);
        assert_eq!(e.unwrap_err(), ChainError::Broken);
        let ring: Vec<_> = (0..8u16).map(|i| (0x9000, 8, W | N, (i + 1) % 8)).collect();
        assert_eq!(read(&ring, MAX_CHAIN).unwrap_err(), ChainError::Broken);
        // A next index beyond the queue (16 entries).
        let e = read(&[(0x9000, 64, W | N, 200)], MAX_CHAIN);
        assert_eq!(e.unwrap_err(), ChainError::Broken);
        // An indirect table inside an indirect table; an indirect table holding a loop.
        let (m, mut q) = setup(&[(0x4000, 16, I, 0)]);
        m.write_obj(0x5000u64, GuestAddress(0x4000)).unwrap();
        m.write_obj(16u32, GuestAddress(0x4008)).unwrap();
        m.write_obj(I, GuestAddress(0x400c)).unwrap();
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            Chain::read(&m, chain, MAX_CHAIN).unwrap_err(),
            ChainError::Broken
        );
        let (m, mut q) = setup(&[(0x4000, 32, I, 0)]);
        for (at, next) in [(0x4000u64, 1u16), (0x4010, 0)] {
            m.write_obj(0x9000u64, GuestAddress(at)).unwrap();
            m.write_obj(64u32, GuestAddress(at + 8)).unwrap();
            m.write_obj(W | N, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(
            Chain::read(&m, chain, MAX_CHAIN).unwrap_err(),
            ChainError::Broken
        );
        // A whole queue's worth that really ends is fine.
        let mut full: Vec<_> = (0..16u16).map(|i| (0x9000, 8, W | N, i + 1)).collect();
        full[15].2 = W;
        assert_eq!(read(&full, MAX_CHAIN).unwrap().writable_bytes(), 128);
    }

    #[test]
    fn copies_gather_and_scatter_across_buffers() {
        let (m, mut q) = setup(&[
            (0x8000, 3, N, 1),
            (0xa000, 5, N, 2),
            (0x9000, 2, W | N, 3),
            (0xb000, 4, W, 0),
        ]);
        m.write_slice(b"abc", GuestAddress(0x8000)).unwrap();
        m.write_slice(b"defgh", GuestAddress(0xa000)).unwrap();
        let c = Chain::read(&m, q.pop_descriptor_chain(&m).unwrap(), MAX_CHAIN).unwrap();
        let mut buf = [0u8; 6];
        c.read_at(&m, 1, &mut buf).unwrap();
        assert_eq!(&buf, b"bcdefg");
        c.write_at(&m, 1, b"xyz").unwrap();
        let (mut a, mut b) = ([0u8; 2], [0u8; 4]);
        m.read_slice(&mut a, GuestAddress(0x9000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0xb000)).unwrap();
        assert_eq!((&a[1..], &b[..2]), (&b"x"[..], &b"yz"[..]));
        assert_eq!(c.write_at(&m, 4, b"xyz"), Err(ChainError::Short));
    }
}
