//! Just enough networking for the `net` self-test: Ethernet frames with a virtio-net header,
//! ARP to find the host's MAC, and an ICMP echo to it; and for the `netpeer` responder: ARP
//! replies and echo replies for the guest's own address.

/// Parses a dotted-quad IPv4 address.
pub fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split(|&c| c == b'.');
    for b in &mut ip {
        let p = parts.next()?;
        let v = crate::bootinfo::parse_u64(p)?;
        *b = u8::try_from(v).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Size of the virtio-net header in front of every frame.
pub const VNET_HDR: usize = 12;

/// Builds an ARP request (who has `target`?) after a zeroed virtio-net header; returns its length.
pub fn arp_request(buf: &mut [u8], mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> usize {
    let f = &mut buf[..VNET_HDR + 42];
    f.fill(0);
    let e = &mut f[VNET_HDR..];
    e[0..6].copy_from_slice(&[0xff; 6]);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&[0x08, 0x06]);
    e[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    e[22..28].copy_from_slice(&mac);
    e[28..32].copy_from_slice(&ip);
    e[38..42].copy_from_slice(&target);
    VNET_HDR + 42
}

/// If `frame` (after the virtio-net header) is an ARP reply from `from`, the sender's MAC.
pub fn arp_reply_from(frame: &[u8], from: [u8; 4]) -> Option<[u8; 6]> {
    let e = frame.get(VNET_HDR..VNET_HDR + 42)?;
    if e[12..14] != [0x08, 0x06] || e[20..22] != [0, 2] || e[28..32] != from {
        return None;
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(&e[22..28]);
    Some(m)
}

/// Payload of our echo requests.
pub const PING_PAYLOAD: &[u8; 32] = b"worldvisor probe guest ping 0123";

/// Builds an ICMP echo request; returns its length.
pub fn echo_request(
    buf: &mut [u8],
    mac: [u8; 6],
    to_mac: [u8; 6],
    ip: [u8; 4],
    to: [u8; 4],
    seq: u16,
) -> usize {
    let len = VNET_HDR + 14 + 20 + 8 + PING_PAYLOAD.len();
    let f = &mut buf[..len];
    f.fill(0);
    let e = &mut f[VNET_HDR..];
    e[0..6].copy_from_slice(&to_mac);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&[0x08, 0x00]);
    let ipl = 20 + 8 + PING_PAYLOAD.len();
    let h = &mut e[14..34];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(ipl as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x5756u16.to_be_bytes());
    h[8] = 64;
    h[9] = 1;
    h[12..16].copy_from_slice(&ip);
    h[16..20].copy_from_slice(&to);
    let c = checksum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut e[34..34 + 8 + PING_PAYLOAD.len()];
    icmp[0] = 8;
    icmp[4..6].copy_from_slice(&0x5756u16.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    icmp[8..].copy_from_slice(PING_PAYLOAD);
    let c = checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    len
}

/// Whether `frame` is the echo reply from `from` to sequence `seq`, checksums valid.
pub fn is_echo_reply(frame: &[u8], from: [u8; 4], seq: u16) -> bool {
    let Some(e) = frame.get(VNET_HDR..) else {
        return false;
    };
    if e.len() < 14 + 20 + 8 + PING_PAYLOAD.len() || e[12..14] != [0x08, 0x00] {
        return false;
    }
    let ihl = usize::from(e[14] & 0xf) * 4;
    let Some(h) = e.get(14..14 + ihl) else {
        return false;
    };
    if h[9] != 1 || h[12..16] != from || checksum(h) != 0 {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let Some(icmp) = e.get(14 + ihl..14 + total) else {
        return false;
    };
    icmp.len() >= 8 + PING_PAYLOAD.len()
        && icmp[0] == 0
        && icmp[4..6] == 0x5756u16.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
        && &icmp[8..8 + PING_PAYLOAD.len()] == PING_PAYLOAD
        && checksum(icmp) == 0
}

/// If `frame` is an ARP request for `ip`, builds the reply from `mac` into `out`; its length.
pub fn arp_answer(frame: &[u8], mac: [u8; 6], ip: [u8; 4], out: &mut [u8]) -> Option<usize> {
    let e = frame.get(VNET_HDR..VNET_HDR + 42)?;
    if e[12..14] != [0x08, 0x06] || e[14..22] != [0, 1, 8, 0, 6, 4, 0, 1] || e[38..42] != ip {
        return None;
    }
    let f = out.get_mut(..VNET_HDR + 42)?;
    f.fill(0);
    let r = &mut f[VNET_HDR..];
    r[0..6].copy_from_slice(&e[6..12]);
    r[6..12].copy_from_slice(&mac);
    r[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    r[22..28].copy_from_slice(&mac);
    r[28..32].copy_from_slice(&ip);
    r[32..42].copy_from_slice(&e[22..32]);
    Some(VNET_HDR + 42)
}

/// If `frame` is an ICMP echo request to `ip` (checksums valid), builds the echo reply from
/// `mac` into `out`; its length.
pub fn echo_answer(frame: &[u8], mac: [u8; 6], ip: [u8; 4], out: &mut [u8]) -> Option<usize> {
    let e = frame.get(VNET_HDR..)?;
    if e.len() < 14 + 20 + 8 || e[12..14] != [0x08, 0x00] || e[14] != 0x45 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([e[16], e[17]]));
    let h = e.get(14..34)?;
    if h[9] != 1 || h[16..20] != ip || checksum(h) != 0 || total < 28 {
        return None;
    }
    let icmp = e.get(34..14 + total)?;
    if icmp[0] != 8 || checksum(icmp) != 0 {
        return None;
    }
    let len = VNET_HDR + 14 + total;
    let f = out.get_mut(..len)?;
    f.fill(0);
    f[VNET_HDR..].copy_from_slice(&frame[VNET_HDR..len]);
    let r = &mut f[VNET_HDR..];
    r[0..6].copy_from_slice(&e[6..12]);
    r[6..12].copy_from_slice(&mac);
    let h = &mut r[14..34];
    h.copy_from_slice(&e[14..34]);
    h[12..16].copy_from_slice(&e[30..34]);
    h[16..20].copy_from_slice(&ip);
    h[8] = 64;
    h[10..12].fill(0);
    let c = checksum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut r[34..14 + total];
    icmp[0] = 0;
    icmp[2..4].fill(0);
    let c = checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}
