//! Moving one frame: a transmit chain read once into a fixed list of segments, validated, and
//! copied straight into the receive buffers a receiver posted (one copy, no allocation).
//!
//! Both guests are hostile: every descriptor is read once ([`Segments::read_tx`],
//! [`Segments::read_rx`]), its range checked against that guest's memory, and the copy made
//! from those checked segments only, never from the descriptors again.
#![allow(clippy::cast_possible_truncation)] // lengths are bounded by MAX_FRAME first

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// The virtio-net header with VERSION_1 (includes num_buffers).
pub const VNET_HDR: usize = 12;
/// Largest frame: header plus the 65550 bytes virtio-net allows a GSO packet (a 64 KiB IP
/// packet behind an Ethernet header and a VLAN tag); longer ones are dropped and counted.
pub const MAX_FRAME: usize = VNET_HDR + 65_550;
/// Most descriptors in one chain this switch takes.
pub const MAX_SEGS: usize = 64;

/// A chain's descriptors as read: (guest address, length), all readable or all writable.
#[derive(Clone, Copy)]
pub struct Segments {
    segs: [(u64, u32); MAX_SEGS],
    n: usize,
    total: usize,
}

/// Why a chain is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// A device-writable buffer in a transmit chain, or a readable one in a receive chain.
    Direction,
    /// More than [`MAX_SEGS`] descriptors.
    TooManySegments,
    /// A buffer outside the guest's memory (or across two regions).
    OutOfMemory,
    /// Shorter than a vnet header, or longer than [`MAX_FRAME`].
    Length,
    /// A chain that loops, runs past the queue's size, or points outside its table (the
    /// queue's iterator stops there; the last descriptor still says another follows).
    Chain,
}

impl Segments {
    /// No segments.
    pub const fn new() -> Segments {
        Segments {
            segs: [(0, 0); MAX_SEGS],
            n: 0,
            total: 0,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn read<M, G>(chain: DescriptorChain<M>, mem: &G, writable: bool) -> Result<Segments, Bad>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
        G: GuestMemoryBackend,
    {
        let mut s = Segments::new();
        let mut more = false;
        for d in chain {
            more = d.has_next();
            if d.is_write_only() != writable {
                return Err(Bad::Direction);
            }
            // A receive chain's room past MAX_FRAME is never written: not taken (a driver
            // that posts big buffers, 17 pages for a 64 KiB segment, posts more than that).
            let len = if writable {
                (d.len() as usize).min(MAX_FRAME - s.total)
            } else {
                d.len() as usize
            };
            if len == 0 {
                continue;
            }
            if s.n == MAX_SEGS {
                return Err(Bad::TooManySegments);
            }
            if mem.get_slice(d.addr(), len).is_err() {
                return Err(Bad::OutOfMemory);
            }
            s.segs[s.n] = (d.addr().0, len as u32);
            s.n += 1;
            s.total = s.total.saturating_add(len);
            if s.total > MAX_FRAME {
                return Err(Bad::Length);
            }
        }
        if more {
            return Err(Bad::Chain);
        }
        Ok(s)
    }

    /// A transmit chain: device-readable buffers holding a vnet header and a frame of at
    /// most [`MAX_FRAME`] bytes in all.
    pub fn read_tx<M, G>(chain: DescriptorChain<M>, mem: &G) -> Result<Segments, Bad>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
        G: GuestMemoryBackend,
    {
        let s = Segments::read(chain, mem, false)?;
        if s.total < VNET_HDR + 14 {
            return Err(Bad::Length);
        }
        Ok(s)
    }

    /// A receive chain: device-writable buffers, their total capped at [`MAX_FRAME`] (the
    /// descriptors past it are checked for direction and chaining, not taken).
    pub fn read_rx<M, G>(chain: DescriptorChain<M>, mem: &G) -> Result<Segments, Bad>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
        G: GuestMemoryBackend,
    {
        Segments::read(chain, mem, true)
    }

    /// Reads `out.len()` bytes at `offset` of the segments (headers the switch looks at).
    pub fn peek<G: GuestMemoryBackend + Bytes<GuestAddress>>(
        &self,
        mem: &G,
        offset: usize,
        out: &mut [u8],
    ) -> bool {
        let mut done = 0;
        self.walk(offset, out.len(), |a, n| {
            let ok = mem
                .read_slice(&mut out[done..done + n], GuestAddress(a))
                .is_ok();
            done += n;
            ok
        })
    }

    /// Calls `f(address, length)` over the `len` bytes from `offset`, in pieces that stay in
    /// one segment; false if a call fails or the segments are too short.
    pub fn walk(&self, offset: usize, len: usize, mut f: impl FnMut(u64, usize) -> bool) -> bool {
        let (mut skip, mut left) = (offset, len);
        for &(a, l) in &self.segs[..self.n] {
            if left == 0 {
                break;
            }
            let l = l as usize;
            if skip >= l {
                skip -= l;
                continue;
            }
            let n = (l - skip).min(left);
            if !f(a + skip as u64, n) {
                return false;
            }
            left -= n;
            skip = 0;
        }
        left == 0
    }

    /// Copies `len` bytes from `self` (in `from`) at `src_off` into `to` (in `into`) at
    /// `dst_off`, guest to guest with no buffer between; false if either side fails.
    pub fn copy_to<F, T>(
        &self,
        from: &F,
        src_off: usize,
        to: &Segments,
        into: &T,
        dst_off: usize,
        len: usize,
    ) -> bool
    where
        F: GuestMemoryBackend,
        T: GuestMemoryBackend,
    {
        // Pieces of the destination, each filled from the source's pieces.
        let mut src_pos = src_off;
        to.walk(dst_off, len, |da, dn| {
            let mut filled = 0;
            let ok = self.walk(src_pos, dn, |sa, sn| {
                let (Ok(s), Ok(d)) = (
                    from.get_slice(GuestAddress(sa), sn),
                    into.get_slice(GuestAddress(da + filled as u64), sn),
                ) else {
                    return false;
                };
                s.copy_to_volatile_slice(d);
                filled += sn;
                true
            });
            src_pos += dn;
            ok
        })
    }

    /// Copies `len` bytes at `offset` into `out` (to a TAP or a queue slot).
    pub fn copy_out<G: GuestMemoryBackend + Bytes<GuestAddress>>(
        &self,
        mem: &G,
        offset: usize,
        out: &mut [u8],
    ) -> bool {
        self.peek(mem, offset, out)
    }

    /// Copies `bytes` into the segments at `offset`.
    pub fn copy_in<G: GuestMemoryBackend + Bytes<GuestAddress>>(
        &self,
        mem: &G,
        offset: usize,
        bytes: &[u8],
    ) -> bool {
        let mut done = 0;
        self.walk(offset, bytes.len(), |a, n| {
            let ok = mem
                .write_slice(&bytes[done..done + n], GuestAddress(a))
                .is_ok();
            done += n;
            ok
        })
    }
}

impl Default for Segments {
    fn default() -> Segments {
        Segments::new()
    }
}
