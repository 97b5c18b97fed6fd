//! The on-disk format (docs/VMKFS.md has the picture): every metadata structure is a 4 KiB
//! page that starts with a magic number and a CRC-32C of the page, little-endian throughout.
//! This module encodes and decodes pages and computes a datastore's geometry; it does no I/O.

use crate::crc::crc32c;
use crate::Error;

/// Size of a metadata page.
pub const PAGE: usize = 4096;
/// Format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Signature after the descriptor's magic number.
pub const SIGNATURE: [u8; 8] = *b"VMKFS\0\0\0";

/// Page magic numbers (the first 4 bytes of every page).
pub const MAGIC_DESCRIPTOR: u32 = u32::from_le_bytes(*b"VKDS");
/// File descriptor page.
pub const MAGIC_FD: u32 = u32::from_le_bytes(*b"VKFD");
/// Pointer block.
pub const MAGIC_POINTERS: u32 = u32::from_le_bytes(*b"VKPB");
/// Allocation map page.
pub const MAGIC_MAP: u32 = u32::from_le_bytes(*b"VKBM");
/// Journal header page.
pub const MAGIC_JOURNAL: u32 = u32::from_le_bytes(*b"VKJH");

/// Smallest and largest block sizes, and the default.
pub const MIN_BLOCK: u64 = 64 << 10;
/// Largest block size.
pub const MAX_BLOCK: u64 = 256 << 20;
/// Default block size.
pub const DEFAULT_BLOCK: u64 = 1 << 20;
/// Default and largest number of files (file-descriptor slots).
pub const DEFAULT_FILES: u32 = 256;
/// Largest number of files.
pub const MAX_FILES: u32 = 16384;
/// Longest file name, in bytes.
pub const MAX_NAME: usize = 127;

/// A pointer-block slot that means "none yet": its 1020 blocks are holes (thin files and redo
/// logs get pointer blocks as they get data).
pub const NO_BLOCK: u32 = u32::MAX;
/// Descriptor pages one file may use (its own and continuations): 7.1 TiB with 1 MiB blocks,
/// whose pointers then take 28 MiB of memory.
pub const MAX_FD_PAGES: usize = 16;
/// Data-block pointers per pointer block (after its 16-byte header).
pub const PTRS_PER_BLOCK: usize = (PAGE - 16) / 4;
/// Pointer-block pointers per file descriptor (from byte 512 of its page).
pub const PB_PER_FD: usize = (PAGE - FD_PTRS_AT) / 8;
const FD_PTRS_AT: usize = 512;
/// Bits per allocation-map page (after its 16-byte header).
pub const BITS_PER_MAP: u64 = ((PAGE - 16) * 8) as u64;
/// Entries per journal header page (after its 32-byte header).
pub const ENTRIES_PER_HEADER: usize = (PAGE - 32) / 12;

/// A page.
pub type Page = [u8; PAGE];

fn get_u32(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn get_u64(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

fn put_u32(p: &mut [u8], at: usize, v: u32) {
    p[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(p: &mut [u8], at: usize, v: u64) {
    p[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `magic` and the page's checksum (computed with the checksum field zero).
pub fn seal(p: &mut Page, magic: u32) {
    put_u32(p, 0, magic);
    put_u32(p, 4, 0);
    let c = crc32c(p);
    put_u32(p, 4, c);
}

/// Checks a page's magic number and checksum; `what` names it in the error.
pub fn verify(p: &Page, magic: u32, what: &str) -> Result<(), Error> {
    let m = get_u32(p, 0);
    if m != magic {
        return Err(Error::Corrupt(format!(
            "{what}: bad magic {:?} (expected {:?})",
            String::from_utf8_lossy(&m.to_le_bytes()),
            String::from_utf8_lossy(&magic.to_le_bytes())
        )));
    }
    let stored = get_u32(p, 4);
    let mut q = *p;
    put_u32(&mut q, 4, 0);
    if crc32c(&q) != stored {
        return Err(Error::Corrupt(format!("{what}: checksum mismatch")));
    }
    Ok(())
}

/// Where everything is, derived from the descriptor's counts. Page numbers count 4 KiB pages
/// from the start of the device; block numbers count blocks of `block_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Data block size in bytes.
    pub block_size: u64,
    /// Blocks on the device, metadata included.
    pub total_blocks: u64,
    /// File-descriptor slots.
    pub max_files: u32,
    /// Pointer-block slots.
    pub ptr_pages: u32,
    /// Journal pages.
    pub journal_pages: u32,
}

impl Geometry {
    /// The geometry for a device of `dev_len` bytes.
    pub fn new(dev_len: u64, block_size: u64, max_files: u32) -> Result<Geometry, Error> {
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "block size {block_size} is not a power of two from 64 KiB to 256 MiB"
            )));
        }
        if !(1..=MAX_FILES).contains(&max_files) {
            return Err(Error::Invalid(format!(
                "{max_files} files: the table holds 1 to {MAX_FILES}"
            )));
        }
        let total_blocks = dev_len / block_size;
        if total_blocks > u64::from(u32::MAX) {
            return Err(Error::Invalid(format!(
                "{total_blocks} blocks do not fit 32-bit block numbers: choose a larger block size"
            )));
        }
        let ptr_pages = total_blocks.div_ceil(PTRS_PER_BLOCK as u64) + u64::from(max_files);
        let mut g = Geometry {
            block_size,
            total_blocks,
            max_files,
            ptr_pages: u32::try_from(ptr_pages)
                .map_err(|_| Error::Invalid("too many pointer blocks".into()))?,
            journal_pages: 0,
        };
        // The journal holds any transaction, even one that rewrites every metadata page.
        let content = 1 + g.table_pages();
        let headers = content.div_ceil(ENTRIES_PER_HEADER as u64);
        g.journal_pages = u32::try_from(content + headers)
            .map_err(|_| Error::Invalid("metadata too large".into()))?;
        if g.first_data_block() >= total_blocks {
            return Err(Error::Invalid(format!(
                "a device of {dev_len} bytes has no room for data after {} bytes of metadata \
                 with {block_size}-byte blocks",
                g.first_data_block() * block_size
            )));
        }
        Ok(g)
    }

    /// Pages after the journal: file descriptors, maps and pointer blocks.
    fn table_pages(&self) -> u64 {
        u64::from(self.max_files)
            + self.dmap_pages()
            + self.pmap_pages()
            + u64::from(self.ptr_pages)
    }
    /// Pages of the data-block allocation map.
    pub fn dmap_pages(&self) -> u64 {
        self.total_blocks.div_ceil(BITS_PER_MAP)
    }
    /// Pages of the pointer-block allocation map.
    pub fn pmap_pages(&self) -> u64 {
        u64::from(self.ptr_pages).div_ceil(BITS_PER_MAP)
    }
    /// First journal page (page 0 is the descriptor, page 1 its copy from mkfs).
    pub fn journal_start(&self) -> u64 {
        2
    }
    /// Page of file descriptor `slot`.
    pub fn fd_page(&self, slot: u32) -> u64 {
        self.journal_start() + u64::from(self.journal_pages) + u64::from(slot)
    }
    /// First page of the data-block map.
    pub fn dmap_start(&self) -> u64 {
        self.fd_page(self.max_files)
    }
    /// First page of the pointer-block map.
    pub fn pmap_start(&self) -> u64 {
        self.dmap_start() + self.dmap_pages()
    }
    /// Page of pointer-block slot `n`.
    pub fn ptr_page(&self, n: u32) -> u64 {
        self.pmap_start() + self.pmap_pages() + u64::from(n)
    }
    /// Pages of metadata in all.
    pub fn meta_pages(&self) -> u64 {
        self.ptr_page(self.ptr_pages)
    }
    /// First block that holds data; the blocks before it hold metadata.
    pub fn first_data_block(&self) -> u64 {
        (self.meta_pages() * PAGE as u64).div_ceil(self.block_size)
    }
    /// Blocks available for data.
    pub fn data_blocks(&self) -> u64 {
        self.total_blocks - self.first_data_block()
    }
    /// Largest file, in bytes: [`MAX_FD_PAGES`] descriptor pages of pointers (and never more
    /// than the file table holds).
    pub fn max_file_size(&self) -> u64 {
        let pages = MAX_FD_PAGES.min(self.max_files as usize);
        (pages * PB_PER_FD * PTRS_PER_BLOCK) as u64 * self.block_size
    }
}

/// The file-system descriptor (page 0, and its copy from mkfs in page 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Geometry.
    pub geo: Geometry,
    /// Identity of the datastore.
    pub uuid: [u8; 16],
    /// A label given at mkfs.
    pub label: String,
    /// Creation time, seconds since 1970.
    pub created: u64,
    /// Sequence number of the last committed metadata transaction.
    pub seq: u64,
}

impl Descriptor {
    /// Encodes and seals.
    pub fn encode(&self) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE]);
        p[8..16].copy_from_slice(&SIGNATURE);
        put_u32(&mut p[..], 16, VERSION);
        put_u64(&mut p[..], 24, self.geo.block_size);
        put_u64(&mut p[..], 32, self.geo.total_blocks);
        put_u64(&mut p[..], 40, self.geo.first_data_block());
        put_u32(&mut p[..], 48, self.geo.max_files);
        put_u32(&mut p[..], 52, self.geo.journal_pages);
        put_u32(&mut p[..], 56, self.geo.ptr_pages);
        // 60: disk number of this extent (0: datastores span one device for now).
        p[72..88].copy_from_slice(&self.uuid);
        let l = self.label.as_bytes();
        p[88..88 + l.len().min(32)].copy_from_slice(&l[..l.len().min(32)]);
        put_u64(&mut p[..], 120, self.created);
        put_u64(&mut p[..], 128, self.seq);
        seal(&mut p, MAGIC_DESCRIPTOR);
        p
    }

    /// Decodes a descriptor page of a device of `dev_len` bytes, checking everything.
    pub fn decode(p: &Page, dev_len: u64) -> Result<Descriptor, Error> {
        if get_u32(p, 0) != MAGIC_DESCRIPTOR || p[8..16] != SIGNATURE {
            return Err(Error::Corrupt(
                "not a VMKFS datastore (no VMKFS signature at offset 0)".into(),
            ));
        }
        verify(p, MAGIC_DESCRIPTOR, "file-system descriptor")?;
        let version = get_u32(p, 16);
        if version != VERSION {
            return Err(Error::Unsupported(format!(
                "VMKFS version {version} (this wv reads version {VERSION})"
            )));
        }
        if get_u32(p, 60) != 0 {
            return Err(Error::Unsupported(
                "a datastore extent other than disk 0 (multi-device datastores)".into(),
            ));
        }
        let block_size = get_u64(p, 24);
        let total_blocks = get_u64(p, 32);
        let max_files = get_u32(p, 48);
        let bad = |what: &str| Error::Corrupt(format!("file-system descriptor: {what}"));
        let geo = Geometry::new(
            total_blocks.saturating_mul(block_size),
            block_size,
            max_files,
        )
        .map_err(|e| bad(&e.to_string()))?;
        if geo.total_blocks != total_blocks
            || geo.journal_pages != get_u32(p, 52)
            || geo.ptr_pages != get_u32(p, 56)
            || geo.first_data_block() != get_u64(p, 40)
        {
            return Err(bad("its counts do not agree with each other"));
        }
        let need = total_blocks * block_size;
        if dev_len < need {
            return Err(Error::Corrupt(format!(
                "the device is truncated: {dev_len} bytes, the datastore needs {need}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&p[72..88]);
        let label = String::from_utf8_lossy(&p[88..120])
            .trim_end_matches('\0')
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Ok(Descriptor {
            geo,
            uuid,
            label,
            created: get_u64(p, 120),
            seq: get_u64(p, 128),
        })
    }
}

/// File flags.
pub mod flags {
    /// Blocks are allocated on first write (else all at creation).
    pub const THIN: u8 = 1;
    /// A redo log: its holes read from its parent.
    pub const REDO: u8 = 2;
    /// The parent of a redo log: read-only until the redo log is committed or reverted.
    pub const FROZEN: u8 = 4;
    /// A continuation: more pointer-block pointers of the file in the slot its parent field
    /// names (a file larger than one descriptor's 448 pointer blocks).
    pub const CONT: u8 = 8;
    /// Every flag this version knows.
    pub const ALL: u8 = THIN | REDO | FROZEN | CONT;
}

/// Where a file descriptor page keeps the token of a hand-over record (byte 81 says there is
/// one): after the name, before the pointer-block pointers.
const HANDOVER_AT: usize = 288;

/// The on-disk record of who has a file open for writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// Since when, seconds since 1970.
    pub since: u64,
    /// A hand-over record (live migration): the holder named here has not taken the file yet;
    /// only a process given this token may ([`crate::disk::Pending::take`]).
    pub handover: Option<u64>,
}

/// A file descriptor (one per slot; `used` false for a free slot).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fd {
    /// Slot in the table.
    pub slot: u32,
    /// Allocated (else free).
    pub used: bool,
    /// [`flags`].
    pub flags: u8,
    /// Generation, new for every file created in this slot.
    pub generation: u64,
    /// Length in bytes.
    pub length: u64,
    /// Parent of a redo log: slot and generation.
    pub parent: Option<(u32, u64)>,
    /// Creation time.
    pub created: u64,
    /// Last metadata change.
    pub modified: u64,
    /// Who has it open for writing.
    pub owner: Option<Owner>,
    /// Name.
    pub name: String,
    /// Pointer blocks: (disk, pointer-block slot). In memory, all of the file's, in order; on
    /// disk, at most [`PB_PER_FD`] per page, the rest in continuation slots.
    pub ptr_blocks: Vec<(u32, u32)>,
    /// Continuation slots, in order (on disk: each page names the next one).
    pub cont: Vec<u32>,
}

impl Fd {
    /// Encodes and seals.
    pub fn encode(&self) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE]);
        put_u32(&mut p[..], 8, self.slot);
        p[12] = u8::from(self.used);
        p[13] = self.flags;
        put_u64(&mut p[..], 16, self.generation);
        put_u64(&mut p[..], 24, self.length);
        let (ps, pg) = self.parent.unwrap_or((u32::MAX, 0));
        put_u32(&mut p[..], 32, ps);
        put_u64(&mut p[..], 40, pg);
        put_u64(&mut p[..], 48, self.created);
        put_u64(&mut p[..], 56, self.modified);
        put_u32(&mut p[..], 64, self.ptr_blocks.len() as u32);
        if let Some(o) = &self.owner {
            put_u32(&mut p[..], 68, o.pid);
            put_u64(&mut p[..], 72, o.since);
            p[80] = 1;
            if let Some(t) = o.handover {
                p[81] = 1;
                put_u64(&mut p[..], HANDOVER_AT, t);
            }
            let h = o.host.as_bytes();
            let n = h.len().min(64);
            p[88..88 + n].copy_from_slice(&h[..n]);
        }
        put_u32(
            &mut p[..],
            152,
            self.cont.first().copied().unwrap_or(u32::MAX),
        );
        let name = self.name.as_bytes();
        p[160..160 + name.len()].copy_from_slice(name);
        debug_assert!(self.ptr_blocks.len() <= PB_PER_FD, "one page's pointers");
        for (i, (disk, block)) in self.ptr_blocks.iter().take(PB_PER_FD).enumerate() {
            put_u32(&mut p[..], FD_PTRS_AT + 8 * i, *disk);
            put_u32(&mut p[..], FD_PTRS_AT + 8 * i + 4, *block);
        }
        seal(&mut p, MAGIC_FD);
        p
    }

    /// Decodes the descriptor page of `slot`.
    pub fn decode(p: &Page, slot: u32) -> Result<Fd, Error> {
        let what = format!("file descriptor {slot}");
        verify(p, MAGIC_FD, &what)?;
        let bad = |m: String| Error::Corrupt(format!("{what}: {m}"));
        if get_u32(p, 8) != slot {
            return Err(bad(format!("it says it is slot {}", get_u32(p, 8))));
        }
        let used = match p[12] {
            0 => false,
            1 => true,
            s => return Err(bad(format!("status {s}"))),
        };
        let flags = p[13];
        if flags & !flags::ALL != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let n = get_u32(p, 64) as usize;
        if n > PB_PER_FD {
            return Err(bad(format!("{n} pointer blocks (at most {PB_PER_FD})")));
        }
        let name_bytes = &p[160..160 + MAX_NAME + 1];
        let end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let name = std::str::from_utf8(&name_bytes[..end])
            .map_err(|_| bad("the name is not UTF-8".into()))?
            .to_string();
        if used && flags & flags::CONT == 0 {
            check_name(&name, true).map_err(|e| bad(e.to_string()))?;
        }
        let next = get_u32(p, 152);
        let ps = get_u32(p, 32);
        let owner = (p[80] == 1).then(|| {
            let h = &p[88..152];
            let e = h.iter().position(|&b| b == 0).unwrap_or(h.len());
            Owner {
                // Printed in messages: no control characters from a crafted datastore.
                host: String::from_utf8_lossy(&h[..e])
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect(),
                pid: get_u32(p, 68),
                since: get_u64(p, 72),
                handover: (p[81] == 1).then(|| get_u64(p, HANDOVER_AT)),
            }
        });
        Ok(Fd {
            slot,
            used,
            flags,
            generation: get_u64(p, 16),
            length: get_u64(p, 24),
            parent: (ps != u32::MAX).then(|| (ps, get_u64(p, 40))),
            created: get_u64(p, 48),
            modified: get_u64(p, 56),
            owner,
            name,
            ptr_blocks: (0..n)
                .map(|i| {
                    (
                        get_u32(p, FD_PTRS_AT + 8 * i),
                        get_u32(p, FD_PTRS_AT + 8 * i + 4),
                    )
                })
                .collect(),
            cont: (used && next != u32::MAX)
                .then_some(next)
                .into_iter()
                .collect(),
        })
    }
}

/// Checks a file name: 1 to 127 bytes of UTF-8 without `/`, NUL or control characters, and
/// without `@` unless `internal` (the names of frozen parents, `NAME@N`, are the file
/// system's own).
pub fn check_name(name: &str, internal: bool) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::Invalid(format!(
            "file name '{name}': 1 to {MAX_NAME} bytes"
        )));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_control() || (c == '@' && !internal))
    {
        return Err(Error::Invalid(format!(
            "file name '{name}': no '/', '@' or control characters"
        )));
    }
    Ok(())
}

/// Encodes pointer block `index` of the file in `slot`.
pub fn encode_pointers(slot: u32, index: u32, ptrs: &[u32]) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE]);
    put_u32(&mut p[..], 8, slot);
    put_u32(&mut p[..], 12, index);
    for (i, b) in ptrs.iter().enumerate() {
        put_u32(&mut p[..], 16 + 4 * i, *b);
    }
    seal(&mut p, MAGIC_POINTERS);
    p
}

/// Decodes a pointer block that should belong to `slot` at `index`.
pub fn decode_pointers(p: &Page, slot: u32, index: u32, what: &str) -> Result<Vec<u32>, Error> {
    verify(p, MAGIC_POINTERS, what)?;
    if get_u32(p, 8) != slot || get_u32(p, 12) != index {
        return Err(Error::Corrupt(format!(
            "{what}: it belongs to file slot {} index {}, not slot {slot} index {index}",
            get_u32(p, 8),
            get_u32(p, 12)
        )));
    }
    Ok((0..PTRS_PER_BLOCK)
        .map(|i| get_u32(p, 16 + 4 * i))
        .collect())
}

/// Encodes allocation-map page `index` of map `kind` (0 data blocks, 1 pointer blocks) from
/// the bitmap words.
pub fn encode_map(kind: u32, index: u32, bits: &[u64]) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE]);
    put_u32(&mut p[..], 8, kind);
    put_u32(&mut p[..], 12, index);
    let words = (PAGE - 16) / 8;
    let start = index as usize * words;
    for (i, w) in bits.iter().skip(start).take(words).enumerate() {
        put_u64(&mut p[..], 16 + 8 * i, *w);
    }
    seal(&mut p, MAGIC_MAP);
    p
}

/// Decodes a map page into `bits`.
pub fn decode_map(p: &Page, kind: u32, index: u32, bits: &mut [u64]) -> Result<(), Error> {
    let what = format!(
        "{} map page {index}",
        if kind == 0 { "block" } else { "pointer-block" }
    );
    verify(p, MAGIC_MAP, &what)?;
    if get_u32(p, 8) != kind || get_u32(p, 12) != index {
        return Err(Error::Corrupt(format!("{what}: misplaced")));
    }
    let words = (PAGE - 16) / 8;
    let start = index as usize * words;
    for (i, w) in bits.iter_mut().skip(start).take(words).enumerate() {
        *w = get_u64(p, 16 + 8 * i);
    }
    Ok(())
}

/// A journal header page: part `part` of `parts` of transaction `seq`, listing (page number,
/// checksum) of the page images that follow the headers.
pub struct JournalHeader {
    /// Transaction sequence number.
    pub seq: u64,
    /// This header's index.
    pub part: u32,
    /// Header pages of the transaction.
    pub parts: u32,
    /// Page images of the whole transaction.
    pub total: u32,
    /// (home page, CRC-32C of the image) of this part's entries.
    pub entries: Vec<(u64, u32)>,
}

impl JournalHeader {
    /// Encodes and seals.
    pub fn encode(&self) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE]);
        put_u64(&mut p[..], 8, self.seq);
        put_u32(&mut p[..], 16, self.part);
        put_u32(&mut p[..], 20, self.parts);
        put_u32(&mut p[..], 24, self.entries.len() as u32);
        put_u32(&mut p[..], 28, self.total);
        for (i, (page, crc)) in self.entries.iter().enumerate() {
            put_u64(&mut p[..], 32 + 12 * i, *page);
            put_u32(&mut p[..], 40 + 12 * i, *crc);
        }
        seal(&mut p, MAGIC_JOURNAL);
        p
    }

    /// Decodes; None when the page is not a valid journal header.
    pub fn decode(p: &Page) -> Option<JournalHeader> {
        verify(p, MAGIC_JOURNAL, "journal").ok()?;
        let n = get_u32(p, 24) as usize;
        if n > ENTRIES_PER_HEADER {
            return None;
        }
        Some(JournalHeader {
            seq: get_u64(p, 8),
            part: get_u32(p, 16),
            parts: get_u32(p, 20),
            total: get_u32(p, 28),
            entries: (0..n)
                .map(|i| (get_u64(p, 32 + 12 * i), get_u32(p, 40 + 12 * i)))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_a_terabyte() {
        let g = Geometry::new(1 << 40, DEFAULT_BLOCK, DEFAULT_FILES).unwrap();
        assert_eq!(g.total_blocks, 1 << 20);
        // 1029 pointer blocks cover 2^20 blocks; 256 slack for partial ones.
        assert_eq!(g.ptr_pages, 1029 + 256);
        assert_eq!(g.dmap_pages(), 33);
        assert!(g.first_data_block() * g.block_size < 16 << 20, "{g:?}");
        assert_eq!(g.max_file_size(), (16 * 448 * 1020) << 20);
    }

    #[test]
    fn pages_round_trip_and_detect_damage() {
        let g = Geometry::new(64 << 20, MIN_BLOCK, 8).unwrap();
        let d = Descriptor {
            geo: g,
            uuid: [7; 16],
            label: "lab".into(),
            created: 5,
            seq: 9,
        };
        let mut p = d.encode();
        assert_eq!(Descriptor::decode(&p, 64 << 20).unwrap(), d);
        assert!(matches!(
            Descriptor::decode(&p, 1 << 20),
            Err(Error::Corrupt(m)) if m.contains("truncated")
        ));
        p[100] ^= 1;
        assert!(Descriptor::decode(&p, 64 << 20).is_err());

        let fd = Fd {
            slot: 3,
            used: true,
            flags: flags::THIN,
            generation: 4,
            length: 1 << 30,
            parent: Some((1, 2)),
            created: 1,
            modified: 2,
            owner: Some(Owner {
                host: "h".into(),
                pid: 42,
                since: 7,
                handover: None,
            }),
            name: "disk".into(),
            ptr_blocks: vec![(0, 5), (0, 6)],
            cont: vec![7],
        };
        let p = fd.encode();
        assert_eq!(Fd::decode(&p, 3).unwrap(), fd);
        assert!(Fd::decode(&p, 4).is_err());
        // An owner record from a crafted datastore cannot put escapes on a terminal.
        let mut evil = fd.clone();
        evil.owner.as_mut().unwrap().host = "h\x1b[2Jx".into();
        let got = Fd::decode(&evil.encode(), 3).unwrap();
        assert_eq!(got.owner.unwrap().host, "h?[2Jx");
        // A hand-over record keeps its token.
        let mut h = fd.clone();
        h.owner.as_mut().unwrap().handover = Some(0x1234_5678_9abc_def0);
        assert_eq!(Fd::decode(&h.encode(), 3).unwrap(), h);
        let ptrs: Vec<u32> = (0..PTRS_PER_BLOCK as u32).collect();
        let p = encode_pointers(3, 1, &ptrs);
        assert_eq!(decode_pointers(&p, 3, 1, "pb").unwrap(), ptrs);
        assert!(decode_pointers(&p, 3, 2, "pb").is_err());
    }

    #[test]
    fn bad_geometry() {
        assert!(Geometry::new(1 << 30, 3 << 20, 8).is_err());
        assert!(Geometry::new(1 << 30, 32 << 10, 8).is_err());
        assert!(Geometry::new(1 << 30, 1 << 20, 0).is_err());
        assert!(Geometry::new(1 << 20, 1 << 20, 8).is_err());
    }
}
