//! The node protocol's wire format: message types, their encoding, and a decoder that
//! validates every field against the region's geometry (docs/DSM.md, "Messages").
//!
//! A frame is `u32 length` (little-endian, the bytes that follow it), then a 4-byte head
//! (`u8 type`, `u8 flags`, `u16` zero) and the type's fixed fields; a PAGE carrying data is
//! followed by exactly one page. Anything else (unknown type, wrong length, nonzero reserved
//! bits, a page outside the region, a node id outside the cluster) is a [`ProtoError`].

use std::fmt;

/// Protocol version carried in INIT; both ends must agree.
pub const PROTOCOL_VERSION: u32 = 3;
/// Size of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Size of the head after the length (type, flags, reserved).
pub const HEAD_BYTES: usize = 4;
/// The largest node count (copy sets are 64-bit masks).
pub const MAX_NODES: u32 = 64;

const T_INIT: u8 = 1;
const T_GET_PAGE: u8 = 2;
const T_FWD_PAGE: u8 = 3;
const T_PAGE: u8 = 4;
const T_INV_PAGE: u8 = 5;
const T_INV_ACK: u8 = 6;
const T_VLD_PAGE: u8 = 7;
const T_PING: u8 = 8;
const T_MIRROR: u8 = 9;
const T_CLAIM: u8 = 10;
const T_LOST: u8 = 11;

const F_UNCHANGED: u8 = 0x80;
/// INIT: the sender mirrors pages (every node of a cluster must agree).
const F_INIT_MIRROR: u8 = 1;
/// MIRROR: how the contents are given (low two bits), and whether it is a hand-off's copy.
const F_MIRROR_ZERO: u8 = 1;
const F_MIRROR_SAME: u8 = 2;
const F_MIRROR_INITIAL: u8 = 4;
const C_OWNER: u8 = 1;
const C_GAVE: u8 = 2;
const C_WANT: u8 = 3;
const C_END: u8 = 4;

/// The access a request asks for or a reply grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read-only copy (the page stays write-protected).
    Read,
    /// Exclusive, writable ownership.
    Write,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::Read => 1,
            Access::Write => 2,
        }
    }
    fn from_bits(b: u8) -> Result<Self, ProtoError> {
        match b {
            1 => Ok(Access::Read),
            2 => Ok(Access::Write),
            _ => Err(ProtoError(format!("bad access flags {b:#x}"))),
        }
    }
}

/// The parameters both ends of a connection must share (exchanged by INIT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Number of nodes in the cluster.
    pub nodes: u32,
    /// Page size in bytes (a power of two).
    pub page_size: u32,
    /// Region size in bytes (a multiple of the page size).
    pub region_size: u64,
}

impl Geometry {
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.region_size / u64::from(self.page_size)
    }
    /// Largest valid frame length (after the length prefix).
    pub fn max_frame(&self) -> usize {
        HEAD_BYTES + 24 + self.page_size as usize
    }
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Join: the sender's node id and its view of the geometry.
    Init {
        /// Protocol version.
        version: u32,
        /// Sender's node id.
        node: u32,
        /// Cluster geometry as the sender sees it.
        geometry: Geometry,
        /// The sender mirrors pages (protocol 3; all nodes must agree).
        mirror: bool,
    },
    /// Requester to the page's manager: read or write access, with the version it holds
    /// (0: nothing but the all-zero initial contents).
    GetPage {
        /// Access wanted.
        access: Access,
        /// Page number.
        page: u64,
        /// Version of the copy the requester holds.
        have: u64,
    },
    /// Manager to the page's owner: serve `requester` (the GET_PAGE, forwarded).
    FwdPage {
        /// Access wanted.
        access: Access,
        /// Page number.
        page: u64,
        /// Version the requester holds.
        have: u64,
        /// Node that asked.
        requester: u32,
    },
    /// Owner to requester: the page (or `None`: unchanged, the requester's copy is current).
    Page {
        /// Access granted.
        access: Access,
        /// Page number.
        page: u64,
        /// Version of the contents sent (or confirmed unchanged).
        version: u64,
        /// The page's bytes, or `None` when the requester's version matches.
        data: Option<Vec<u8>>,
    },
    /// Manager to a copy holder: drop your read copy.
    InvPage {
        /// Page number.
        page: u64,
    },
    /// Copy holder to manager: dropped.
    InvAck {
        /// Page number.
        page: u64,
    },
    /// Requester to manager: the page is now valid here for `access` at `version`; closes
    /// the manager's transaction for the page.
    VldPage {
        /// Access now held.
        access: Access,
        /// Page number.
        page: u64,
        /// Version now held.
        version: u64,
    },
    /// Heartbeat: sent on a connection that has had nothing else to carry for a while, so
    /// that silence means a dead or stalled peer. No fields.
    Ping,
    /// Mirroring: a page's contents at `version`, kept by the receiver (the holder's mirror
    /// node) so that they outlive the holder.
    Mirror {
        /// Page number.
        page: u64,
        /// Version of the contents.
        version: u64,
        /// The contents.
        contents: MirrorData,
        /// A hand-off's copy (sent by the old owner as it grants write access): the oldest
        /// contents of `version`, so it never replaces a push of the same version.
        initial: bool,
    },
    /// Recovery after the loss of a node: what the sender knows about a page whose manager
    /// was the lost node, sent to the page's new manager; or the end of those reports.
    Claim {
        /// Page number (0 for [`Claim::End`]).
        page: u64,
        /// Version (see [`Claim`]; 0 for [`Claim::End`]).
        version: u64,
        /// What is claimed.
        claim: Claim,
    },
    /// Recovery: the sender lost `node` (every node that hears it loses it too); followed by
    /// the sender's claims and a [`Claim::End`].
    Lost {
        /// The lost node.
        node: u32,
    },
}

/// The contents a MIRROR message carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorData {
    /// Exactly one page.
    Data(Vec<u8>),
    /// All zeros.
    Zero,
    /// The contents of version `base`, which the receiver holds (an upgrade in place).
    Same {
        /// The version whose contents are unchanged.
        base: u64,
    },
}

/// A recovery report (CLAIM message), see docs/DSM.md, "Mirroring".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The sender owns the page at `version`.
    Owner,
    /// The last PAGE the sender served for the page (as its owner) went to `to`, granting
    /// `access`, with contents of `version`.
    Gave {
        /// The requester served.
        to: u32,
        /// The access granted.
        access: Access,
    },
    /// The sender asked for `access` and has not been granted it; it holds `version`.
    Want {
        /// The access asked for.
        access: Access,
    },
    /// The end of the sender's claims for the loss of `lost`.
    End {
        /// The lost node.
        lost: u32,
    },
}

impl Msg {
    /// The seed's name for the message type.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Init { .. } => "INIT",
            Msg::GetPage { .. } => "GET_PAGE",
            Msg::FwdPage { .. } => "FWD_PAGE",
            Msg::Page { .. } => "PAGE",
            Msg::InvPage { .. } => "INV_PAGE",
            Msg::InvAck { .. } => "INV_ACK",
            Msg::VldPage { .. } => "VLD_PAGE",
            Msg::Ping => "PING",
            Msg::Mirror { .. } => "MIRROR",
            Msg::Claim { .. } => "CLAIM",
            Msg::Lost { .. } => "LOST",
        }
    }
}

/// A protocol violation: the connection it came from is closed with this text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}

fn head(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8) {
    // Frame lengths are bounded by max_frame (a page plus 20 bytes), far below u32::MAX.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[ty, flags, 0, 0]);
}

/// Appends the encoding of a PAGE header whose `page_size` data bytes the caller appends next
/// (so that a page can be copied straight from memory into the output buffer).
pub fn encode_page_head(
    out: &mut Vec<u8>,
    access: Access,
    page: u64,
    version: u64,
    page_size: usize,
) {
    head(out, HEAD_BYTES + 16 + page_size, T_PAGE, access.bits());
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
}

/// Appends the encoding of `msg` to `out`.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) {
    match msg {
        Msg::Init {
            version,
            node,
            geometry,
            mirror,
        } => {
            let flags = if *mirror { F_INIT_MIRROR } else { 0 };
            head(out, HEAD_BYTES + 24, T_INIT, flags);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&geometry.nodes.to_le_bytes());
            out.extend_from_slice(&geometry.page_size.to_le_bytes());
            out.extend_from_slice(&geometry.region_size.to_le_bytes());
        }
        Msg::GetPage { access, page, have } => {
            head(out, HEAD_BYTES + 16, T_GET_PAGE, access.bits());
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&have.to_le_bytes());
        }
        Msg::FwdPage {
            access,
            page,
            have,
            requester,
        } => {
            head(out, HEAD_BYTES + 24, T_FWD_PAGE, access.bits());
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&have.to_le_bytes());
            out.extend_from_slice(&requester.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        Msg::Page {
            access,
            page,
            version,
            data,
        } => match data {
            Some(d) => {
                encode_page_head(out, *access, *page, *version, d.len());
                out.extend_from_slice(d);
            }
            None => {
                head(out, HEAD_BYTES + 16, T_PAGE, access.bits() | F_UNCHANGED);
                out.extend_from_slice(&page.to_le_bytes());
                out.extend_from_slice(&version.to_le_bytes());
            }
        },
        Msg::InvPage { page } => {
            head(out, HEAD_BYTES + 8, T_INV_PAGE, 0);
            out.extend_from_slice(&page.to_le_bytes());
        }
        Msg::InvAck { page } => {
            head(out, HEAD_BYTES + 8, T_INV_ACK, 0);
            out.extend_from_slice(&page.to_le_bytes());
        }
        Msg::VldPage {
            access,
            page,
            version,
        } => {
            head(out, HEAD_BYTES + 16, T_VLD_PAGE, access.bits());
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&version.to_le_bytes());
        }
        Msg::Ping => head(out, HEAD_BYTES, T_PING, 0),
        Msg::Mirror {
            page,
            version,
            contents,
            initial,
        } => {
            let init = if *initial { F_MIRROR_INITIAL } else { 0 };
            let (flags, base, data): (u8, u64, &[u8]) = match contents {
                MirrorData::Data(d) => (0, 0, d),
                MirrorData::Zero => (F_MIRROR_ZERO, 0, &[]),
                MirrorData::Same { base } => (F_MIRROR_SAME, *base, &[]),
            };
            head(out, HEAD_BYTES + 24 + data.len(), T_MIRROR, flags | init);
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&base.to_le_bytes());
            out.extend_from_slice(data);
        }
        Msg::Claim {
            page,
            version,
            claim,
        } => {
            let (kind, access, node) = match claim {
                Claim::Owner => (C_OWNER, 0, 0),
                Claim::Gave { to, access } => (C_GAVE, access.bits(), *to),
                Claim::Want { access } => (C_WANT, access.bits(), 0),
                Claim::End { lost } => (C_END, 0, *lost),
            };
            head(out, HEAD_BYTES + 24, T_CLAIM, kind | access << 4);
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        Msg::Lost { node } => {
            head(out, HEAD_BYTES + 8, T_LOST, 0);
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Validates INIT's geometry on its own (before it can be compared with ours).
pub fn check_geometry(g: &Geometry) -> Result<(), ProtoError> {
    if g.nodes == 0 || g.nodes > MAX_NODES {
        return Err(ProtoError(format!(
            "node count {} outside 1..={MAX_NODES}",
            g.nodes
        )));
    }
    if !g.page_size.is_power_of_two() || !(512..=1 << 21).contains(&g.page_size) {
        return Err(ProtoError(format!("bad page size {}", g.page_size)));
    }
    if g.region_size == 0 || !g.region_size.is_multiple_of(u64::from(g.page_size)) {
        return Err(ProtoError(format!(
            "region size {} is not a nonzero multiple of the page size {}",
            g.region_size, g.page_size
        )));
    }
    Ok(())
}

/// Decodes one frame from the start of `buf` for a connection with geometry `g`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame, `Ok(Some((msg, used)))` for a
/// whole valid one, and an error for anything invalid (never panics, whatever `buf` holds).
pub fn decode(buf: &[u8], g: &Geometry) -> Result<Option<(Msg, usize)>, ProtoError> {
    if buf.len() < LEN_BYTES {
        return Ok(None);
    }
    let len = u32_at(buf, 0) as usize;
    if len < HEAD_BYTES || len > g.max_frame() {
        return Err(ProtoError(format!(
            "frame length {len} outside {HEAD_BYTES}..={}",
            g.max_frame()
        )));
    }
    if buf.len() < LEN_BYTES + len {
        return Ok(None);
    }
    let f = &buf[LEN_BYTES..LEN_BYTES + len];
    let (ty, flags) = (f[0], f[1]);
    if f[2] != 0 || f[3] != 0 {
        return Err(ProtoError("nonzero reserved bytes in a frame head".into()));
    }
    let body = &f[HEAD_BYTES..];
    let want = |n: usize, name: &str| -> Result<(), ProtoError> {
        if body.len() == n {
            Ok(())
        } else {
            Err(ProtoError(format!(
                "{name} of {} bytes, expected {n}",
                body.len()
            )))
        }
    };
    let pages = g.pages();
    let page_at = |at: usize| -> Result<u64, ProtoError> {
        let p = u64_at(body, at);
        if p < pages {
            Ok(p)
        } else {
            Err(ProtoError(format!(
                "page {p} outside the region ({pages} pages)"
            )))
        }
    };
    let no_flags = |name: &str| -> Result<(), ProtoError> {
        if flags == 0 {
            Ok(())
        } else {
            Err(ProtoError(format!("{name} with flags {flags:#x}")))
        }
    };
    let msg = match ty {
        T_INIT => {
            want(24, "INIT")?;
            if flags & !F_INIT_MIRROR != 0 {
                return Err(ProtoError(format!("INIT with flags {flags:#x}")));
            }
            let geometry = Geometry {
                nodes: u32_at(body, 8),
                page_size: u32_at(body, 12),
                region_size: u64_at(body, 16),
            };
            check_geometry(&geometry)?;
            let node = u32_at(body, 4);
            if node >= geometry.nodes {
                return Err(ProtoError(format!(
                    "INIT from node {node} of {}",
                    geometry.nodes
                )));
            }
            Msg::Init {
                version: u32_at(body, 0),
                node,
                geometry,
                mirror: flags & F_INIT_MIRROR != 0,
            }
        }
        T_GET_PAGE => {
            want(16, "GET_PAGE")?;
            Msg::GetPage {
                access: Access::from_bits(flags)?,
                page: page_at(0)?,
                have: u64_at(body, 8),
            }
        }
        T_FWD_PAGE => {
            want(24, "FWD_PAGE")?;
            let requester = u32_at(body, 16);
            if requester >= g.nodes {
                return Err(ProtoError(format!(
                    "FWD_PAGE for node {requester} of {}",
                    g.nodes
                )));
            }
            if u32_at(body, 20) != 0 {
                return Err(ProtoError("FWD_PAGE with nonzero padding".into()));
            }
            Msg::FwdPage {
                access: Access::from_bits(flags)?,
                page: page_at(0)?,
                have: u64_at(body, 8),
                requester,
            }
        }
        T_PAGE => {
            let access = Access::from_bits(flags & !F_UNCHANGED)?;
            let data = if flags & F_UNCHANGED != 0 {
                want(16, "PAGE (unchanged)")?;
                None
            } else {
                want(16 + g.page_size as usize, "PAGE")?;
                Some(body[16..].to_vec())
            };
            Msg::Page {
                access,
                page: page_at(0)?,
                version: u64_at(body, 8),
                data,
            }
        }
        T_INV_PAGE => {
            want(8, "INV_PAGE")?;
            no_flags("INV_PAGE")?;
            Msg::InvPage { page: page_at(0)? }
        }
        T_INV_ACK => {
            want(8, "INV_ACK")?;
            no_flags("INV_ACK")?;
            Msg::InvAck { page: page_at(0)? }
        }
        T_VLD_PAGE => {
            want(16, "VLD_PAGE")?;
            Msg::VldPage {
                access: Access::from_bits(flags)?,
                page: page_at(0)?,
                version: u64_at(body, 8),
            }
        }
        T_PING => {
            want(0, "PING")?;
            no_flags("PING")?;
            Msg::Ping
        }
        T_MIRROR => {
            if flags & !(3 | F_MIRROR_INITIAL) != 0 {
                return Err(ProtoError(format!("MIRROR with flags {flags:#x}")));
            }
            let base = if body.len() >= 24 {
                u64_at(body, 16)
            } else {
                0
            };
            let contents = match flags & 3 {
                0 => {
                    want(24 + g.page_size as usize, "MIRROR")?;
                    MirrorData::Data(body[24..].to_vec())
                }
                F_MIRROR_ZERO => {
                    want(24, "MIRROR (zero)")?;
                    MirrorData::Zero
                }
                F_MIRROR_SAME => {
                    want(24, "MIRROR (same)")?;
                    MirrorData::Same { base }
                }
                _ => return Err(ProtoError(format!("MIRROR with flags {flags:#x}"))),
            };
            let version = u64_at(body, 8);
            let base_ok = match contents {
                MirrorData::Same { base } => base < version,
                _ => base == 0,
            };
            if !base_ok {
                return Err(ProtoError(format!(
                    "MIRROR at version {version} with base version {base}"
                )));
            }
            Msg::Mirror {
                page: page_at(0)?,
                version,
                contents,
                initial: flags & F_MIRROR_INITIAL != 0,
            }
        }
        T_CLAIM => {
            want(24, "CLAIM")?;
            let node = u32_at(body, 16);
            if u32_at(body, 20) != 0 {
                return Err(ProtoError("CLAIM with nonzero padding".into()));
            }
            if node >= g.nodes {
                return Err(ProtoError(format!("CLAIM for node {node} of {}", g.nodes)));
            }
            let (kind, access) = (flags & 0xf, flags >> 4);
            let (page, version) = (page_at(0)?, u64_at(body, 8));
            let claim = match kind {
                C_OWNER | C_END if access != 0 => {
                    return Err(ProtoError(format!("CLAIM with flags {flags:#x}")))
                }
                C_OWNER if node == 0 => Claim::Owner,
                C_GAVE => Claim::Gave {
                    to: node,
                    access: Access::from_bits(access)?,
                },
                C_WANT if node == 0 => Claim::Want {
                    access: Access::from_bits(access)?,
                },
                C_END if page == 0 && version == 0 => Claim::End { lost: node },
                C_OWNER | C_WANT | C_END => {
                    return Err(ProtoError(format!(
                        "CLAIM of kind {kind} with stray fields"
                    )))
                }
                k => return Err(ProtoError(format!("CLAIM of unknown kind {k}"))),
            };
            Msg::Claim {
                page,
                version,
                claim,
            }
        }
        T_LOST => {
            want(8, "LOST")?;
            no_flags("LOST")?;
            let node = u32_at(body, 0);
            if node >= g.nodes {
                return Err(ProtoError(format!("LOST for node {node} of {}", g.nodes)));
            }
            if u32_at(body, 4) != 0 {
                return Err(ProtoError("LOST with nonzero padding".into()));
            }
            Msg::Lost { node }
        }
        t => return Err(ProtoError(format!("unknown message type {t}"))),
    };
    Ok(Some((msg, LEN_BYTES + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        nodes: 3,
        page_size: 4096,
        region_size: 16 * 4096,
    };

    fn roundtrip(m: Msg) {
        let mut b = Vec::new();
        encode(&m, &mut b);
        let (d, used) = decode(&b, &G).unwrap().unwrap();
        assert_eq!(d, m);
        assert_eq!(used, b.len());
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut], &G), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Msg::Init {
            version: 1,
            node: 2,
            geometry: G,
            mirror: true,
        });
        roundtrip(Msg::GetPage {
            access: Access::Write,
            page: 15,
            have: 7,
        });
        roundtrip(Msg::FwdPage {
            access: Access::Read,
            page: 3,
            have: 0,
            requester: 2,
        });
        roundtrip(Msg::Page {
            access: Access::Read,
            page: 1,
            version: 9,
            data: Some(vec![5; 4096]),
        });
        roundtrip(Msg::Page {
            access: Access::Write,
            page: 1,
            version: 9,
            data: None,
        });
        roundtrip(Msg::InvPage { page: 4 });
        roundtrip(Msg::InvAck { page: 4 });
        roundtrip(Msg::VldPage {
            access: Access::Write,
            page: 0,
            version: 3,
        });
        roundtrip(Msg::Ping);
        for (contents, initial) in [
            (MirrorData::Data(vec![3; 4096]), true),
            (MirrorData::Zero, false),
            (MirrorData::Same { base: 4 }, false),
        ] {
            roundtrip(Msg::Mirror {
                page: 7,
                version: 5,
                contents,
                initial,
            });
        }
        for claim in [
            Claim::Owner,
            Claim::Gave {
                to: 2,
                access: Access::Write,
            },
            Claim::Want {
                access: Access::Read,
            },
        ] {
            roundtrip(Msg::Claim {
                page: 9,
                version: 4,
                claim,
            });
        }
        roundtrip(Msg::Claim {
            page: 0,
            version: 0,
            claim: Claim::End { lost: 1 },
        });
        roundtrip(Msg::Lost { node: 2 });
    }

    #[test]
    fn bad_mirroring_messages_are_errors() {
        let mut b = Vec::new();
        encode(
            &Msg::Mirror {
                page: 1,
                version: 3,
                contents: MirrorData::Same { base: 3 },
                initial: false,
            },
            &mut b,
        );
        assert_eq!(err(&b), "MIRROR at version 3 with base version 3");
        b[5] = 3;
        assert_eq!(err(&b), "MIRROR with flags 0x3");
        b.clear();
        encode(&Msg::Lost { node: 3 }, &mut b);
        assert_eq!(err(&b), "LOST for node 3 of 3");
        b.clear();
        encode(
            &Msg::Claim {
                page: 1,
                version: 0,
                claim: Claim::End { lost: 1 },
            },
            &mut b,
        );
        assert_eq!(err(&b), "CLAIM of kind 4 with stray fields");
        b[5] = 9;
        assert_eq!(err(&b), "CLAIM of unknown kind 9");
        b[5] = 0x21;
        assert_eq!(err(&b), "CLAIM with flags 0x21");
        b.clear();
        encode(
            &Msg::Claim {
                page: 1,
                version: 0,
                claim: Claim::Want {
                    access: Access::Read,
                },
            },
            &mut b,
        );
        b[5] = 0x33;
        assert_eq!(err(&b), "bad access flags 0x3");
    }

    fn err(b: &[u8]) -> String {
        decode(b, &G).unwrap_err().0
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut b = Vec::new();
        encode(
            &Msg::GetPage {
                access: Access::Read,
                page: 16,
                have: 0,
            },
            &mut b,
        );
        assert_eq!(err(&b), "page 16 outside the region (16 pages)");
        b.clear();
        encode(
            &Msg::FwdPage {
                access: Access::Read,
                page: 1,
                have: 0,
                requester: 3,
            },
            &mut b,
        );
        assert_eq!(err(&b), "FWD_PAGE for node 3 of 3");
        assert_eq!(decode(&[200, 0, 0, 0, 42, 0, 0, 0], &G), Ok(None));
        assert_eq!(err(&[4, 0, 0, 0, 42, 0, 0, 0]), "unknown message type 42");
        assert_eq!(
            err(&[0xff, 0xff, 0xff, 0xff]),
            "frame length 4294967295 outside 4..=4124"
        );
        assert_eq!(
            err(&[11, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
            "INV_PAGE of 7 bytes, expected 8"
        );
        b.clear();
        encode(
            &Msg::VldPage {
                access: Access::Read,
                page: 1,
                version: 0,
            },
            &mut b,
        );
        b[5] = 3;
        assert_eq!(err(&b), "bad access flags 0x3");
        b[5] = 1;
        b[6] = 1;
        assert_eq!(err(&b), "nonzero reserved bytes in a frame head");
        // A data PAGE one byte short.
        b.clear();
        encode_page_head(&mut b, Access::Read, 0, 1, 4095);
        b.extend_from_slice(&[0; 4095]);
        assert_eq!(err(&b), "PAGE of 4111 bytes, expected 4112");
        assert_eq!(
            err(&[5, 0, 0, 0, 8, 0, 0, 0, 0]),
            "PING of 1 bytes, expected 0"
        );
        assert_eq!(err(&[4, 0, 0, 0, 8, 1, 0, 0]), "PING with flags 0x1");
    }
}
