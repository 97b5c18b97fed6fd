//! Checksum and segmentation offloads: the virtio-net header a sender hands the switch, checked
//! against its frame and the features the sender acked ([`parse`]); the form each receiver
//! takes it in, by the features it acked ([`form`]); and the software fallbacks, a checksum
//! filled in ([`finish`]) and a TCP segment cut into MSS-sized frames whose headers are rebuilt
//! one by one ([`segment_headers`]). Pure functions over bytes: the copying is the switch's.
#![allow(clippy::cast_possible_truncation)] // offsets are bounded by MAX_FRAME (< 64 KiB + 15)

/// VIRTIO_NET_F_CSUM: the driver may send partially checksummed frames.
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM: the driver takes partially checksummed frames.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_GUEST_TSO4: the driver takes TCP/IPv4 segments longer than its MTU.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6: the same for TCP/IPv6.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_HOST_TSO4: the driver may send TCP/IPv4 segments for the device to cut.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6: the same for TCP/IPv6.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// Every offload the switch offers.
pub const OFFLOADS: u64 =
    F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;

/// `flags`: the checksum from `csum_start` on is to be filled in.
pub const NEEDS_CSUM: u8 = 1;
/// `gso_type`s.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// The ECN bit of `gso_type` (HOST_ECN is not offered: refused).
pub const GSO_ECN: u8 = 0x80;

/// Most header bytes (Ethernet with one VLAN tag, IPv4 with options, TCP with options) a
/// segmented frame has; also how much of a frame [`parse`] looks at.
pub const MAX_HDRS: usize = 18 + 60 + 60;

/// What a sender's header asks of the switch, checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offload {
    /// A whole frame, checksums done (or a sender that acked no offload: its header ignored).
    #[default]
    None,
    /// The ones' complement sum of the frame from `start` on goes at `start + offset`.
    Csum {
        /// Where the sum starts (in the Ethernet frame).
        start: u16,
        /// Where it goes, from `start`.
        offset: u16,
    },
    /// A TCP segment to be cut into `mss`-sized frames.
    Tso(Tso),
}

/// A TCP segment's layout (offsets in the Ethernet frame), and its headers as checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tso {
    /// TCP over IPv6 (else IPv4).
    pub v6: bool,
    /// The IP header.
    pub l3: u16,
    /// The TCP header.
    pub l4: u16,
    /// Header bytes in all (Ethernet, IP, TCP), each segment's.
    pub hdrs: u16,
    /// Payload bytes per segment (`gso_size`).
    pub mss: u16,
    /// The frame's first `hdrs` bytes as [`parse`] checked them (the rest zero). What the
    /// switch delivers as the segment's headers, whole or rebuilt per cut segment: the
    /// sender's memory may have changed since, and is read again only for the payload.
    pub head: [u8; MAX_HDRS],
}

impl Tso {
    /// Writes the headers as checked over the start of `eth` (an Ethernet frame at least
    /// `hdrs` long: the frame they were checked against, copied again).
    pub fn restore_headers(&self, eth: &mut [u8]) {
        let hdrs = usize::from(self.hdrs);
        eth[..hdrs].copy_from_slice(&self.head[..hdrs]);
    }

    /// How many frames a segment of `len` Ethernet bytes becomes.
    pub fn segments(&self, len: usize) -> usize {
        (len - usize::from(self.hdrs)).div_ceil(usize::from(self.mss))
    }
}

/// Why a header is refused (the frame is dropped and counted: `dropped_bad_offload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadOffload {
    /// `csum_start + csum_offset` leaves no room for the sum in the frame, or `csum_start`
    /// points into the Ethernet header (which the switch has already switched on).
    CsumRange,
    /// A segmentation type the sender did not ack, or one that is not TCP (UDP, ECN).
    GsoType,
    /// `gso_size` below [`MIN_MSS`]: a segment may not be cut into more, smaller frames than
    /// a TCP stack would send (a tiny size would turn one charged frame into tens of
    /// thousands delivered).
    GsoSize,
    /// A segment whose checksum fields do not name its TCP checksum.
    GsoCsum,
    /// A segment that is not an unfragmented TCP/IP packet filling the frame.
    NotTcp,
    /// `hdr_len` past the end of the frame.
    HdrLen,
    /// A segment without payload.
    Empty,
}

/// The smallest `gso_size` taken: Linux's TCP_MIN_MSS. At most 65550 / 88 = 744 segments.
pub const MIN_MSS: u16 = 88;

/// Where a checksum may start: past the Ethernet header.
const MIN_CSUM_START: u16 = 14;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Checks a sender's virtio-net header `vhdr` (12 bytes) against its frame: `head` is the
/// frame's first `min(len, MAX_HDRS)` bytes, `len` its length (Ethernet, without the header),
/// `acked` the sender's features. A sender that acked no CSUM has its header ignored (the
/// specification has it send zeros, and the switch always wrote its own).
pub fn parse(vhdr: &[u8], head: &[u8], len: usize, acked: u64) -> Result<Offload, BadOffload> {
    if acked & F_CSUM == 0 || vhdr.len() < 10 {
        return Ok(Offload::None);
    }
    let (flags, gso) = (vhdr[0], vhdr[1]);
    let (hdr_len, gso_size) = (usize::from(le16(vhdr, 2)), le16(vhdr, 4));
    let (cs, co) = (le16(vhdr, 6), le16(vhdr, 8));
    if gso == GSO_NONE {
        if flags & NEEDS_CSUM == 0 {
            return Ok(Offload::None);
        }
        if cs < MIN_CSUM_START || usize::from(cs) + usize::from(co) + 2 > len {
            return Err(BadOffload::CsumRange);
        }
        return Ok(Offload::Csum {
            start: cs,
            offset: co,
        });
    }
    let v6 = match gso {
        GSO_TCPV4 if acked & F_HOST_TSO4 != 0 => false,
        GSO_TCPV6 if acked & F_HOST_TSO6 != 0 => true,
        _ => return Err(BadOffload::GsoType),
    };
    if gso_size < MIN_MSS {
        return Err(BadOffload::GsoSize);
    }
    if hdr_len > len {
        return Err(BadOffload::HdrLen);
    }
    let head = &head[..head.len().min(len).min(MAX_HDRS)];
    let (mut l3, mut ethertype) = (14, be16(head, 12).ok_or(BadOffload::NotTcp)?);
    if ethertype == 0x8100 {
        l3 = 18;
        ethertype = be16(head, 16).ok_or(BadOffload::NotTcp)?;
    }
    let l4 = if v6 {
        if ethertype != 0x86dd
            || head.get(l3).is_none_or(|b| b >> 4 != 6)
            || head.get(l3 + 6) != Some(&6)
            || be16(head, l3 + 4).map(usize::from) != len.checked_sub(l3 + 40)
        {
            return Err(BadOffload::NotTcp);
        }
        l3 + 40
    } else {
        let Some(&vihl) = head.get(l3) else {
            return Err(BadOffload::NotTcp);
        };
        let ihl = usize::from(vihl & 15) * 4;
        if ethertype != 0x0800
            || vihl >> 4 != 4
            || ihl < 20
            || head.get(l3 + 9) != Some(&6)
            || be16(head, l3 + 2).map(usize::from) != len.checked_sub(l3)
            // More fragments, or an offset: not a whole packet.
            || be16(head, l3 + 6).is_none_or(|f| f & 0x3fff != 0)
        {
            return Err(BadOffload::NotTcp);
        }
        l3 + ihl
    };
    let Some(&doff) = head.get(l4 + 12) else {
        return Err(BadOffload::NotTcp);
    };
    let th = usize::from(doff >> 4) * 4;
    let hdrs = l4 + th;
    if th < 20 || hdrs > head.len() {
        return Err(BadOffload::NotTcp);
    }
    if flags & NEEDS_CSUM == 0 || usize::from(cs) != l4 || co != 16 {
        return Err(BadOffload::GsoCsum);
    }
    if hdrs >= len {
        return Err(BadOffload::Empty);
    }
    let mut checked = [0u8; MAX_HDRS];
    checked[..hdrs].copy_from_slice(&head[..hdrs]);
    Ok(Offload::Tso(Tso {
        v6,
        l3: l3 as u16,
        l4: l4 as u16,
        hdrs: hdrs as u16,
        mss: gso_size,
        head: checked,
    }))
}

/// The form a receiver that acked `features` takes a frame in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Whole, behind this header (`num_buffers` still to be set).
    Whole([u8; 12]),
    /// Whole, its checksum filled in by the switch (header zero).
    Fill {
        /// Where the sum starts.
        start: usize,
        /// Where the sum goes.
        at: usize,
    },
    /// Cut into segments by the switch (headers zero, checksums complete).
    Segment(Tso),
}

/// How frame `off` reaches a receiver that acked `features`.
pub fn form(off: &Offload, features: u64) -> Form {
    let mut h = [0u8; 12];
    match *off {
        Offload::None => Form::Whole(h),
        Offload::Csum { start, offset } => {
            if features & F_GUEST_CSUM != 0 {
                h[0] = NEEDS_CSUM;
                h[6..8].copy_from_slice(&start.to_le_bytes());
                h[8..10].copy_from_slice(&offset.to_le_bytes());
                Form::Whole(h)
            } else {
                Form::Fill {
                    start: usize::from(start),
                    at: usize::from(start) + usize::from(offset),
                }
            }
        }
        Offload::Tso(t) => {
            let f = if t.v6 { F_GUEST_TSO6 } else { F_GUEST_TSO4 };
            if features & f != 0 && features & F_GUEST_CSUM != 0 {
                h[0] = NEEDS_CSUM;
                h[1] = if t.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
                h[2..4].copy_from_slice(&t.hdrs.to_le_bytes());
                h[4..6].copy_from_slice(&t.mss.to_le_bytes());
                h[6..8].copy_from_slice(&t.l4.to_le_bytes());
                h[8..10].copy_from_slice(&16u16.to_le_bytes());
                Form::Whole(h)
            } else {
                Form::Segment(t)
            }
        }
    }
}

/// Adds `data` to a ones' complement sum as big-endian 16-bit words (an odd last byte padded
/// with zero): `data` must start at an even offset of what is summed.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut w = data.chunks_exact(2);
    for p in &mut w {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [b] = w.remainder() {
        acc += u64::from(*b) << 8;
    }
    acc
}

/// The checksum to store for sum `acc`: folded to 16 bits and complemented (0 as 0xffff, which
/// verifies the same and is what UDP needs).
pub fn finish(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    match !(acc as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// Writes segment `i` of `nseg`'s headers into `out[..t.hdrs]`, from the segment's original
/// headers `orig` (at least `t.hdrs` bytes): IP lengths, the IPv4 id (+i) and header checksum,
/// the TCP sequence number (+i*mss), FIN and PSH on the last segment only, CWR on the first
/// only, and the TCP checksum over the pseudo-header, the TCP header and `payload_sum` (the
/// [`sum`] of the segment's `seg_len` payload bytes).
pub fn segment_headers(
    t: &Tso,
    orig: &[u8],
    out: &mut [u8],
    i: usize,
    nseg: usize,
    seg_len: usize,
    payload_sum: u64,
) {
    let (l3, l4, hdrs) = (usize::from(t.l3), usize::from(t.l4), usize::from(t.hdrs));
    out[..hdrs].copy_from_slice(&orig[..hdrs]);
    let tcp_len = hdrs - l4 + seg_len;
    let mut acc = 6u64 + tcp_len as u64;
    if t.v6 {
        out[l3 + 4..l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        acc = sum(&out[l3 + 8..l3 + 40], acc);
    } else {
        let tot = (l4 - l3 + tcp_len) as u16;
        out[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
        let id = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]).wrapping_add(i as u16);
        out[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
        out[l3 + 10..l3 + 12].fill(0);
        let c = !fold(sum(&out[l3..l4], 0));
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        acc = sum(&out[l3 + 12..l3 + 20], acc);
    }
    let seq = u32::from_be_bytes([out[l4 + 4], out[l4 + 5], out[l4 + 6], out[l4 + 7]])
        .wrapping_add((i as u32).wrapping_mul(u32::from(t.mss)));
    out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    if i + 1 != nseg {
        out[l4 + 13] &= !(0x01 | 0x08); // FIN, PSH
    }
    if i != 0 {
        out[l4 + 13] &= !0x80; // CWR
    }
    out[l4 + 16..l4 + 18].fill(0);
    let c = finish(sum(&out[l4..hdrs], acc) + payload_sum);
    out[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}
