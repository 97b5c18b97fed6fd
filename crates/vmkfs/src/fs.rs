//! The datastore: all metadata loaded at open and kept in memory; every change is a
//! transaction — done in memory under the datastore's metadata lock, then journaled (page
//! images with checksums, flushed), then written to the pages' homes (flushed). Data written to
//! newly allocated blocks is flushed before the transaction that points to it, and blocks freed
//! by a transaction are reused only after it commits, so a crash at any point leaves the old or
//! the new state of every operation and never a pointer to unwritten or reused data.

use crate::dev::{Dev, LockKind};
use crate::format::{
    self, check_name, flags, Descriptor, Fd, Geometry, JournalHeader, Owner, Page,
    ENTRIES_PER_HEADER, PAGE, PTRS_PER_BLOCK,
};
use crate::{io, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Options of `mkfs`.
#[derive(Clone, Debug)]
pub struct MkfsOptions {
    /// Block size in bytes (64 KiB to 256 MiB, a power of two).
    pub block_size: u64,
    /// File-descriptor slots.
    pub max_files: u32,
    /// A label (up to 32 bytes).
    pub label: String,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            block_size: format::DEFAULT_BLOCK,
            max_files: format::DEFAULT_FILES,
            label: String::new(),
        }
    }
}

/// A datastore's summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Info {
    /// UUID, hex with dashes.
    pub uuid: String,
    /// Label.
    pub label: String,
    /// Format version.
    pub version: u32,
    /// Block size in bytes.
    pub block_size: u64,
    /// Bytes of the device in use by the datastore.
    pub size: u64,
    /// Blocks for data.
    pub data_blocks: u64,
    /// Free data blocks.
    pub free_blocks: u64,
    /// Bytes of metadata on disk (journal included).
    pub metadata_bytes: u64,
    /// Files and free slots.
    pub files: u32,
    /// File slots in all.
    pub max_files: u32,
    /// Largest file.
    pub max_file_size: u64,
    /// Last committed transaction.
    pub transaction: u64,
    /// Bytes of memory the cached metadata takes.
    pub cached_metadata_bytes: u64,
}

/// One file as `ls` shows it.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct FileInfo {
    /// Name.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// Bytes of data blocks it holds.
    pub allocated: u64,
    /// `preallocated`, `thin` or `redo-log`.
    pub kind: String,
    /// Frozen: the parent of a redo log.
    pub frozen: bool,
    /// The parent of a redo log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Who has it open for writing (as recorded in the datastore).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Creation time, seconds since 1970.
    pub created: u64,
}

/// What `check` found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Inconsistencies (empty: the datastore is consistent).
    pub problems: Vec<String>,
    /// Things worth knowing that are not inconsistencies (stale locks, a replayed journal).
    pub notes: Vec<String>,
    /// Whether `--repair` rewrote the metadata.
    pub repaired: bool,
}

/// A datastore open on a device.
pub struct Datastore {
    pub(crate) dev: Arc<dyn Dev>,
    pub(crate) desc: Descriptor,
    pub(crate) fds: Vec<Fd>,
    /// Per slot, the data-block pointers of its pointer blocks (whole pointer blocks).
    pub(crate) ptrs: Vec<Vec<u32>>,
    dmap: Vec<u64>,
    pmap: Vec<u64>,
    /// The on-disk image of every metadata page in use, to write only what changed.
    cache: HashMap<u64, Box<Page>>,
    /// Blocks freed by the running transaction, reusable once it commits.
    pending_free: Vec<u32>,
    /// Set after an I/O error in a commit: memory and disk may differ.
    broken: bool,
    host: String,
    progress: Option<ProgressFn>,
}

/// Told of the progress of long operations (zeroing a new preallocated disk): what, bytes
/// done, bytes in all.
pub type ProgressFn = Box<dyn FnMut(&str, u64, u64) + Send>;

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This host's name, as owner records give it.
pub fn this_host() -> String {
    hostname()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn bit(bits: &[u64], i: u64) -> bool {
    bits[(i / 64) as usize] >> (i % 64) & 1 == 1
}

fn set_bit(bits: &mut [u64], i: u64, v: bool) {
    let w = &mut bits[(i / 64) as usize];
    if v {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

/// Formats a UUID.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(b) = std::fs::read("/proc/sys/kernel/random/uuid") {
        let hex: Vec<u8> = b.iter().copied().filter(u8::is_ascii_hexdigit).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            u[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("0"), 16).unwrap_or(0);
        }
    }
    u
}

/// The metadata as it was when a transaction began: restored if it fails, compared with to
/// commit only what changed.
struct Before {
    desc: Descriptor,
    fds: Vec<Fd>,
    ptrs: Vec<Vec<u32>>,
    dmap: Vec<u64>,
    pmap: Vec<u64>,
}

/// A journaled transaction: its sequence number and (home page, image) pairs.
type Transaction = (u64, Vec<(u64, Box<Page>)>);

/// How strictly to load: an open refuses damage, `check` collects it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Lenient,
}

/// Whether a descriptor is a file (in use and not a continuation of another's).
fn is_file(f: &Fd) -> bool {
    f.used && f.flags & flags::CONT == 0
}

/// Number of blocks a file of `len` bytes spans.
pub(crate) fn blocks_for(len: u64, block_size: u64) -> u64 {
    len.div_ceil(block_size)
}

impl Datastore {
    /// Creates an empty datastore on `dev` (everything on it is lost).
    pub fn mkfs(dev: Arc<dyn Dev>, opts: &MkfsOptions) -> Result<Datastore> {
        if opts.label.len() > 32 || opts.label.chars().any(char::is_control) {
            return Err(Error::Invalid(format!(
                "label {:?}: at most 32 bytes, no control characters",
                opts.label
            )));
        }
        let geo = Geometry::new(dev.len(), opts.block_size, opts.max_files)?;
        let desc = Descriptor {
            geo: geo.clone(),
            uuid: random_uuid(),
            label: opts.label.clone(),
            created: now(),
            seq: 0,
        };
        let mut ds = Datastore::empty(dev, desc);
        for b in 0..geo.first_data_block() {
            set_bit(&mut ds.dmap, b, true);
        }
        // Every page from scratch: an old journal must not replay into the new datastore.
        let pages = ds.encode_all();
        let jpage = Box::new([0u8; PAGE]);
        ds.dev
            .write_at(&jpage[..], geo.journal_start() * PAGE as u64)
            .map_err(io("clearing the journal"))?;
        ds.write_pages(&pages)?;
        ds.dev
            .write_at(&pages[&0][..], PAGE as u64)
            .map_err(io("writing the descriptor's copy"))?;
        ds.dev.flush().map_err(io("flushing"))?;
        ds.cache = pages;
        Ok(ds)
    }

    fn empty(dev: Arc<dyn Dev>, desc: Descriptor) -> Datastore {
        let g = &desc.geo;
        let fds = (0..g.max_files)
            .map(|slot| Fd {
                slot,
                ..Fd::default()
            })
            .collect();
        Datastore {
            ptrs: vec![Vec::new(); g.max_files as usize],
            dmap: vec![0; g.total_blocks.div_ceil(64) as usize],
            pmap: vec![0; u64::from(g.ptr_pages).div_ceil(64) as usize],
            fds,
            desc,
            dev,
            cache: HashMap::new(),
            pending_free: Vec::new(),
            broken: false,
            host: hostname(),
            progress: None,
        }
    }

    /// Opens the datastore on `dev`, replaying an interrupted transaction.
    pub fn open(dev: Arc<dyn Dev>) -> Result<Datastore> {
        dev.lock(0, LockKind::Exclusive, true)
            .map_err(io("locking the datastore's metadata"))?;
        let r = Datastore::load(dev.clone(), Mode::Strict).map(|(d, _)| d);
        let _ = dev.unlock(0);
        r
    }

    /// The device.
    pub fn dev(&self) -> &Arc<dyn Dev> {
        &self.dev
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.desc.geo
    }

    fn read_page(dev: &dyn Dev, n: u64) -> Result<Box<Page>> {
        let mut p = Box::new([0u8; PAGE]);
        dev.read_at(&mut p[..], n * PAGE as u64)
            .map_err(io(format!("reading metadata page {n}")))?;
        Ok(p)
    }

    /// The last transaction in the journal, if it is whole: (seq, [(home page, image)]).
    fn journal(dev: &dyn Dev, g: &Geometry) -> Result<Option<Transaction>> {
        let start = g.journal_start();
        let Some(first) = JournalHeader::decode(&*Datastore::read_page(dev, start)?) else {
            return Ok(None);
        };
        let parts = first.parts;
        if first.part != 0
            || parts == 0
            || u64::from(parts) + u64::from(first.total) > u64::from(g.journal_pages)
        {
            return Ok(None);
        }
        let mut entries = first.entries.clone();
        for i in 1..parts {
            match JournalHeader::decode(&*Datastore::read_page(dev, start + u64::from(i))?) {
                Some(h) if h.seq == first.seq && h.part == i && h.parts == parts => {
                    entries.extend(h.entries)
                }
                _ => return Ok(None),
            }
        }
        if entries.len() != first.total as usize {
            return Ok(None);
        }
        let mut images = Vec::with_capacity(entries.len());
        for (i, (home, crc)) in entries.into_iter().enumerate() {
            let p = Datastore::read_page(dev, start + u64::from(parts) + i as u64)?;
            if crate::crc::crc32c(&p[..]) != crc || home >= g.meta_pages() || home == 1 {
                return Ok(None);
            }
            images.push((home, p));
        }
        Ok(Some((first.seq, images)))
    }

    /// Loads everything; returns the datastore and, in lenient mode, what was wrong (repaired
    /// in memory: damaged slots freed, damaged pointers dropped).
    fn load(dev: Arc<dyn Dev>, mode: Mode) -> Result<(Datastore, Report)> {
        let mut report = Report::default();
        let len = dev.len();
        if len < 2 * PAGE as u64 {
            return Err(Error::Corrupt(format!(
                "the device is truncated: {len} bytes hold no descriptor"
            )));
        }
        let p0 = Datastore::read_page(&*dev, 0)?;
        let (mut desc, p0_ok) = match Descriptor::decode(&p0, len) {
            Ok(d) => (d, true),
            Err(e @ (Error::Unsupported(_) | Error::Io(_))) => return Err(e),
            Err(Error::Corrupt(m)) if m.contains("truncated") => return Err(Error::Corrupt(m)),
            Err(e) => {
                let p1 = Datastore::read_page(&*dev, 1)?;
                match Descriptor::decode(&p1, len) {
                    Ok(d) => (d, false),
                    Err(_) => return Err(e),
                }
            }
        };
        // Replay the journal's transaction unless it is older than the descriptor: the
        // descriptor may have reached its home before other pages of the same transaction,
        // so pages that differ from their images are rewritten (usually none).
        if let Some((seq, images)) = Datastore::journal(&*dev, &desc.geo)? {
            if seq >= desc.seq || !p0_ok {
                let mut replayed = 0;
                for (home, p) in &images {
                    if Datastore::read_page(&*dev, *home)?[..] != p[..] {
                        dev.write_at(&p[..], home * PAGE as u64)
                            .map_err(io("replaying the journal"))?;
                        replayed += 1;
                    }
                }
                if replayed > 0 {
                    dev.flush().map_err(io("flushing the replayed journal"))?;
                    report.notes.push(format!(
                        "replayed journal transaction {seq} ({replayed} of its {} pages)",
                        images.len()
                    ));
                    let p0 = Datastore::read_page(&*dev, 0)?;
                    desc = Descriptor::decode(&p0, len)?;
                }
            }
        } else if !p0_ok {
            let e = Error::Corrupt(
                "the file-system descriptor is damaged (its copy from mkfs is intact: \
                 `wv fs check --repair` restores it)"
                    .into(),
            );
            if mode == Mode::Strict {
                return Err(e);
            }
            report.problems.push(e.to_string());
        }
        let g = desc.geo.clone();
        let mut ds = Datastore::empty(dev.clone(), desc);
        let mut problem = |m: String| -> Result<()> {
            if mode == Mode::Strict {
                Err(Error::Corrupt(format!(
                    "{m} (`wv fs check --repair` can fix the datastore)"
                )))
            } else {
                report.problems.push(m);
                Ok(())
            }
        };
        // File descriptors, in one read.
        let mut table = vec![0u8; g.max_files as usize * PAGE];
        dev.read_at(&mut table, g.fd_page(0) * PAGE as u64)
            .map_err(io("reading the file table"))?;
        for slot in 0..g.max_files {
            let mut p = [0u8; PAGE];
            p.copy_from_slice(&table[slot as usize * PAGE..(slot as usize + 1) * PAGE]);
            match Fd::decode(&p, slot) {
                Ok(fd) => ds.fds[slot as usize] = fd,
                Err(e) => problem(format!("{e}; the slot is freed and its file lost"))?,
            }
        }
        // Files larger than one descriptor: follow their continuation slots.
        let mut claimed = vec![false; g.max_files as usize];
        for slot in 0..g.max_files as usize {
            let fd = ds.fds[slot].clone();
            if !is_file(&fd) || fd.cont.is_empty() {
                continue;
            }
            let mut chain = Vec::new();
            let mut pbs = fd.ptr_blocks.clone();
            let mut next = fd.cont.first().copied();
            let mut broken = None;
            while let Some(c) = next {
                let ok = ds.fds.get(c as usize).is_some_and(|f| {
                    f.used
                        && f.flags & flags::CONT != 0
                        && f.parent == Some((slot as u32, fd.generation))
                        && !claimed[c as usize]
                });
                if !ok || chain.len() + 1 >= format::MAX_FD_PAGES {
                    broken = Some(c);
                    break;
                }
                claimed[c as usize] = true;
                chain.push(c);
                pbs.extend(ds.fds[c as usize].ptr_blocks.iter().copied());
                next = ds.fds[c as usize].cont.first().copied();
            }
            if let Some(c) = broken {
                problem(format!(
                    "file '{}': its continuation slot {c} is missing or damaged; the file is lost",
                    fd.name
                ))?;
                for s in chain.into_iter().chain(std::iter::once(slot as u32)) {
                    let generation = ds.fds[s as usize].generation;
                    ds.fds[s as usize] = Fd {
                        slot: s,
                        generation,
                        ..Fd::default()
                    };
                }
                continue;
            }
            ds.fds[slot].ptr_blocks = pbs;
            ds.fds[slot].cont = chain;
        }
        for (slot, &mine) in claimed.iter().enumerate() {
            let f = &mut ds.fds[slot];
            if f.used && f.flags & flags::CONT != 0 {
                if mine {
                    // A placeholder: its pointers live in the file's descriptor.
                    f.ptr_blocks.clear();
                    f.cont.clear();
                } else {
                    let generation = f.generation;
                    problem(format!(
                        "continuation slot {slot} belongs to no file; freed"
                    ))?;
                    ds.fds[slot] = Fd {
                        slot: slot as u32,
                        generation,
                        ..Fd::default()
                    };
                }
            }
        }
        // Allocation maps.
        for (kind, start, pages) in [
            (0u32, g.dmap_start(), g.dmap_pages()),
            (1, g.pmap_start(), g.pmap_pages()),
        ] {
            for i in 0..pages {
                let p = Datastore::read_page(&*dev, start + i)?;
                let bits = if kind == 0 {
                    &mut ds.dmap
                } else {
                    &mut ds.pmap
                };
                if let Err(e) = format::decode_map(&p, kind, i as u32, bits) {
                    problem(format!("{e}; the map is rebuilt from the files"))?;
                }
            }
        }
        // Pointer blocks of every file.
        for slot in 0..g.max_files as usize {
            let fd = ds.fds[slot].clone();
            if !is_file(&fd) {
                continue;
            }
            let need = blocks_for(fd.length, g.block_size).div_ceil(PTRS_PER_BLOCK as u64);
            if fd.length > g.max_file_size() || fd.ptr_blocks.len() as u64 != need {
                problem(format!(
                    "file '{}': {} pointer blocks for {} bytes (needs {need})",
                    fd.name,
                    fd.ptr_blocks.len(),
                    fd.length
                ))?;
                ds.fds[slot] = Fd {
                    slot: slot as u32,
                    generation: fd.generation,
                    ..Fd::default()
                };
                continue;
            }
            let mut ptrs = Vec::with_capacity(fd.ptr_blocks.len() * PTRS_PER_BLOCK);
            let mut good_pbs = Vec::new();
            for (i, &(disk, pb)) in fd.ptr_blocks.iter().enumerate() {
                let what = format!("file '{}': pointer block {i}", fd.name);
                if disk == 0 && pb == format::NO_BLOCK {
                    // Not allocated yet: all holes.
                    ptrs.extend(std::iter::repeat_n(0, PTRS_PER_BLOCK));
                    good_pbs.push(None);
                    continue;
                }
                if disk != 0 || pb >= g.ptr_pages {
                    problem(format!(
                        "{what}: address ({disk}, {pb}) is outside the datastore"
                    ))?;
                    ptrs.extend(std::iter::repeat_n(0, PTRS_PER_BLOCK));
                    good_pbs.push(None);
                    continue;
                }
                let p = Datastore::read_page(&*dev, g.ptr_page(pb))?;
                match format::decode_pointers(&p, slot as u32, i as u32, &what) {
                    Ok(v) => {
                        ptrs.extend(v);
                        good_pbs.push(Some(pb));
                    }
                    Err(e) => {
                        problem(format!("{e}; those blocks read as zeros"))?;
                        ptrs.extend(std::iter::repeat_n(0, PTRS_PER_BLOCK));
                        good_pbs.push(None);
                    }
                }
            }
            let nblocks = blocks_for(fd.length, g.block_size) as usize;
            for (i, b) in ptrs.iter_mut().enumerate() {
                if *b == 0 {
                    continue;
                }
                let bad = u64::from(*b) < g.first_data_block() || u64::from(*b) >= g.total_blocks;
                if bad || i >= nblocks {
                    problem(format!(
                        "file '{}': block {i} points to {} ({})",
                        fd.name,
                        *b,
                        if bad {
                            "outside the data area"
                        } else {
                            "beyond the end of the file"
                        }
                    ))?;
                    *b = 0;
                }
            }
            // Damaged pointer blocks become absent ones: holes.
            ds.fds[slot].ptr_blocks = good_pbs
                .iter()
                .map(|p| (0, p.unwrap_or(format::NO_BLOCK)))
                .collect();
            ds.ptrs[slot] = ptrs;
        }
        // References between files.
        for slot in 0..g.max_files as usize {
            let fd = ds.fds[slot].clone();
            if !is_file(&fd) {
                continue;
            }
            if let Some((ps, pg)) = fd.parent {
                let ok = ds
                    .fds
                    .get(ps as usize)
                    .is_some_and(|p| is_file(p) && p.generation == pg && ps as usize != slot);
                if !ok || fd.flags & flags::REDO == 0 {
                    problem(format!(
                        "redo log '{}': its parent (slot {ps}) is gone",
                        fd.name
                    ))?;
                    ds.fds[slot].parent = None;
                    ds.fds[slot].flags &= !flags::REDO;
                }
            } else if fd.flags & flags::REDO != 0 {
                problem(format!("redo log '{}' has no parent", fd.name))?;
                ds.fds[slot].flags &= !flags::REDO;
            }
        }
        ds.cache = ds.encode_all();
        Ok((ds, report))
    }

    /// The descriptor pages of `slot`: a free slot's, or a file's own and its continuations'
    /// (a continuation placeholder has none of its own: its file writes it).
    fn fd_pages(&self, slot: usize) -> Vec<(u64, Box<Page>)> {
        let g = &self.desc.geo;
        let fd = &self.fds[slot];
        if fd.used && fd.flags & flags::CONT != 0 {
            return Vec::new();
        }
        if fd.cont.is_empty() {
            return vec![(g.fd_page(fd.slot), fd.encode())];
        }
        let mut chunks = fd.ptr_blocks.chunks(format::PB_PER_FD);
        let mut own = fd.clone();
        own.ptr_blocks = chunks.next().unwrap_or_default().to_vec();
        let mut out = vec![(g.fd_page(fd.slot), own.encode())];
        for (k, &c) in fd.cont.iter().enumerate() {
            let page = Fd {
                slot: c,
                used: true,
                flags: flags::CONT,
                generation: self.fds[c as usize].generation,
                parent: Some((fd.slot, fd.generation)),
                ptr_blocks: chunks.next().unwrap_or_default().to_vec(),
                cont: fd.cont[k + 1..].to_vec(),
                ..Fd::default()
            };
            out.push((g.fd_page(c), page.encode()));
        }
        out
    }

    /// Every metadata page in use, encoded.
    fn encode_all(&self) -> HashMap<u64, Box<Page>> {
        let g = &self.desc.geo;
        let mut pages = HashMap::new();
        pages.insert(0, self.desc.encode());
        for fd in &self.fds {
            pages.extend(self.fd_pages(fd.slot as usize));
            for (i, &(_, pb)) in fd.ptr_blocks.iter().enumerate() {
                if pb < g.ptr_pages {
                    let v =
                        &self.ptrs[fd.slot as usize][i * PTRS_PER_BLOCK..(i + 1) * PTRS_PER_BLOCK];
                    pages.insert(
                        g.ptr_page(pb),
                        format::encode_pointers(fd.slot, i as u32, v),
                    );
                }
            }
        }
        for i in 0..g.dmap_pages() {
            pages.insert(
                g.dmap_start() + i,
                format::encode_map(0, i as u32, &self.dmap),
            );
        }
        for i in 0..g.pmap_pages() {
            pages.insert(
                g.pmap_start() + i,
                format::encode_map(1, i as u32, &self.pmap),
            );
        }
        pages
    }

    /// The pages that differ from `b`, encoded: the descriptor (its sequence number always
    /// changes), changed file descriptors, changed pointer blocks and changed map pages. What a
    /// transaction costs is then in proportion to what it changed, not to the datastore.
    fn changed_pages(&self, b: &Before) -> HashMap<u64, Box<Page>> {
        let g = &self.desc.geo;
        let mut pages = HashMap::new();
        pages.insert(0, self.desc.encode());
        for (slot, fd) in self.fds.iter().enumerate() {
            let old = &b.fds[slot];
            if fd != old {
                pages.extend(self.fd_pages(slot));
            }
            let moved = fd.ptr_blocks != old.ptr_blocks;
            for (i, &(_, pb)) in fd.ptr_blocks.iter().enumerate() {
                if pb >= g.ptr_pages {
                    continue;
                }
                let range = i * PTRS_PER_BLOCK..(i + 1) * PTRS_PER_BLOCK;
                let new = &self.ptrs[slot][range.clone()];
                if moved || b.ptrs[slot].get(range) != Some(new) {
                    pages.insert(
                        g.ptr_page(pb),
                        format::encode_pointers(slot as u32, i as u32, new),
                    );
                }
            }
        }
        let words = (PAGE - 16) / 8;
        for (kind, start, count, now, then) in [
            (0, g.dmap_start(), g.dmap_pages(), &self.dmap, &b.dmap),
            (1, g.pmap_start(), g.pmap_pages(), &self.pmap, &b.pmap),
        ] {
            for i in 0..count as usize {
                let r = i * words..((i + 1) * words).min(now.len());
                if now[r.clone()] != then[r] {
                    pages.insert(start + i as u64, format::encode_map(kind, i as u32, now));
                }
            }
        }
        pages
    }

    /// Writes pages to their homes, contiguous runs in one write each.
    fn write_pages(&self, pages: &HashMap<u64, Box<Page>>) -> Result<()> {
        let sorted: BTreeMap<u64, &Page> = pages.iter().map(|(k, v)| (*k, &**v)).collect();
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        let mut next = u64::MAX;
        for (&n, p) in &sorted {
            if n != next && !run.is_empty() {
                self.dev
                    .write_at(&run, run_start * PAGE as u64)
                    .map_err(io("writing metadata"))?;
                run.clear();
            }
            if run.is_empty() {
                run_start = n;
            }
            run.extend_from_slice(&p[..]);
            next = n + 1;
        }
        if !run.is_empty() {
            self.dev
                .write_at(&run, run_start * PAGE as u64)
                .map_err(io("writing metadata"))?;
        }
        Ok(())
    }

    /// Commits what changed in memory: data flushed, journal written and flushed, homes
    /// written and flushed.
    fn commit(&mut self, before: Option<&Before>) -> Result<()> {
        self.desc.seq += 1;
        let all = match before {
            Some(b) => self.changed_pages(b),
            None => self.encode_all(),
        };
        let dirty: HashMap<u64, Box<Page>> = all
            .into_iter()
            .filter(|(n, p)| self.cache.get(n).is_none_or(|c| c[..] != p[..]))
            .collect();
        let g = self.desc.geo.clone();
        self.dev
            .flush()
            .map_err(io("flushing data before a metadata update"))?;
        let order: Vec<u64> = {
            let mut v: Vec<u64> = dirty.keys().copied().collect();
            v.sort_unstable();
            v
        };
        let parts = order.len().div_ceil(ENTRIES_PER_HEADER).max(1);
        let mut images = Vec::with_capacity(order.len() * PAGE);
        for n in &order {
            images.extend_from_slice(&dirty[n][..]);
        }
        self.dev
            .write_at(&images, (g.journal_start() + parts as u64) * PAGE as u64)
            .map_err(io("writing the journal"))?;
        let mut headers = Vec::with_capacity(parts * PAGE);
        for (i, chunk) in order.chunks(ENTRIES_PER_HEADER).enumerate() {
            let h = JournalHeader {
                seq: self.desc.seq,
                part: i as u32,
                parts: parts as u32,
                total: order.len() as u32,
                entries: chunk
                    .iter()
                    .map(|n| (*n, crate::crc::crc32c(&dirty[n][..])))
                    .collect(),
            };
            headers.extend_from_slice(&h.encode()[..]);
        }
        self.dev
            .write_at(&headers, g.journal_start() * PAGE as u64)
            .map_err(io("writing the journal"))?;
        self.dev.flush().map_err(io("flushing the journal"))?;
        self.write_pages(&dirty)?;
        self.dev.flush().map_err(io("flushing metadata"))?;
        self.cache.extend(dirty);
        Ok(())
    }

    /// Runs `f` as one transaction under the metadata lock: first catches up with changes
    /// other handles committed, and on error leaves memory as it was.
    pub(crate) fn txn<T>(&mut self, f: impl FnOnce(&mut Datastore) -> Result<T>) -> Result<T> {
        if self.broken {
            return Err(Error::Io(
                "an earlier metadata write failed: reopen the datastore".into(),
            ));
        }
        self.dev
            .lock(0, LockKind::Exclusive, true)
            .map_err(io("locking the datastore's metadata"))?;
        let r = self.txn_locked(f);
        let _ = self.dev.unlock(0);
        r
    }

    fn txn_locked<T>(&mut self, f: impl FnOnce(&mut Datastore) -> Result<T>) -> Result<T> {
        self.refresh()?;
        let before = Before {
            desc: self.desc.clone(),
            fds: self.fds.clone(),
            ptrs: self.ptrs.clone(),
            dmap: self.dmap.clone(),
            pmap: self.pmap.clone(),
        };
        self.pending_free.clear();
        let r = f(self);
        let r = r.and_then(|v| {
            for b in std::mem::take(&mut self.pending_free) {
                set_bit(&mut self.dmap, u64::from(b), false);
            }
            self.commit(Some(&before))
                .map(|()| v)
                .inspect_err(|_| self.broken = true)
        });
        if r.is_err() && !self.broken {
            Before {
                desc: self.desc,
                fds: self.fds,
                ptrs: self.ptrs,
                dmap: self.dmap,
                pmap: self.pmap,
            } = before;
        }
        r
    }

    /// Reloads the metadata if another handle committed since it was loaded (or left a
    /// transaction to replay).
    fn refresh(&mut self) -> Result<()> {
        let p0 = Datastore::read_page(&*self.dev, 0)?;
        let current = Descriptor::decode(&p0, self.dev.len()).is_ok_and(|d| d.seq == self.desc.seq)
            && Datastore::journal(&*self.dev, &self.desc.geo)?
                .is_none_or(|(seq, _)| seq <= self.desc.seq);
        if !current {
            let (fresh, _) = Datastore::load(self.dev.clone(), Mode::Strict)?;
            let host = std::mem::take(&mut self.host);
            let progress = self.progress.take();
            *self = fresh;
            self.host = host;
            self.progress = progress;
        }
        Ok(())
    }

    /// Catches up with changes other handles committed (for a long-lived handle before it
    /// reads the file list).
    pub fn reload(&mut self) -> Result<()> {
        self.dev
            .lock(0, LockKind::Exclusive, true)
            .map_err(io("locking the datastore's metadata"))?;
        let r = self.refresh();
        let _ = self.dev.unlock(0);
        r
    }

    // ---- allocation ----

    fn free_blocks(&self) -> u64 {
        let g = &self.desc.geo;
        (g.first_data_block()..g.total_blocks)
            .filter(|&b| !bit(&self.dmap, b))
            .count() as u64
    }

    /// Allocates `n` data blocks, first fit (contiguous on a fresh datastore).
    pub(crate) fn alloc_blocks(&mut self, n: u64) -> Result<Vec<u32>> {
        let g = self.desc.geo.clone();
        let mut out = Vec::with_capacity(n as usize);
        let mut b = g.first_data_block();
        while (out.len() as u64) < n && b < g.total_blocks {
            if self.dmap[(b / 64) as usize] == u64::MAX {
                b = (b / 64 + 1) * 64;
                continue;
            }
            if !bit(&self.dmap, b) {
                out.push(b as u32);
            }
            b += 1;
        }
        if (out.len() as u64) < n {
            return Err(Error::NoSpace(format!(
                "{n} blocks of {} needed, {} free",
                g.block_size,
                out.len()
            )));
        }
        for &b in &out {
            set_bit(&mut self.dmap, u64::from(b), true);
        }
        Ok(out)
    }

    fn alloc_ptr_blocks(&mut self, n: usize) -> Result<Vec<(u32, u32)>> {
        let total = self.desc.geo.ptr_pages;
        let free: Vec<u32> = (0..total)
            .filter(|&p| !bit(&self.pmap, u64::from(p)))
            .take(n)
            .collect();
        if free.len() < n {
            return Err(Error::NoSpace(format!(
                "{n} pointer blocks needed, {} free",
                free.len()
            )));
        }
        for &p in &free {
            set_bit(&mut self.pmap, u64::from(p), true);
        }
        Ok(free.into_iter().map(|p| (0, p)).collect())
    }

    /// Points block `i` of `slot` at data block `b`, giving the file the pointer block that
    /// holds it if it has none yet.
    pub(crate) fn set_ptr(&mut self, slot: usize, i: usize, b: u32) -> Result<()> {
        let pb = i / PTRS_PER_BLOCK;
        if b != 0 && self.fds[slot].ptr_blocks[pb].1 == format::NO_BLOCK {
            self.fds[slot].ptr_blocks[pb] = self.alloc_ptr_blocks(1)?[0];
        }
        self.ptrs[slot][i] = b;
        Ok(())
    }

    /// Zeroes data blocks, merging contiguous runs.
    fn zero_blocks(&mut self, blocks: &[u32]) -> Result<()> {
        let bs = self.desc.geo.block_size;
        // Runs of at most 1 GiB, so progress can be told when a device zeroes by writing.
        let most = ((1u64 << 30) / bs).max(1) as usize;
        let total = blocks.len() as u64 * bs;
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && j - i < most && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            self.dev
                .zero(u64::from(blocks[i]) * bs, (j - i) as u64 * bs)
                .map_err(io("zeroing new blocks"))?;
            if let Some(p) = self.progress.as_mut() {
                p("zeroing", j as u64 * bs, total);
            }
            i = j;
        }
        Ok(())
    }

    /// Sets (or clears) what is told of the progress of long operations.
    pub fn set_progress(&mut self, f: Option<ProgressFn>) {
        self.progress = f;
    }

    /// Frees a file's slot, pointer blocks and data blocks.
    pub(crate) fn free_file(&mut self, slot: usize) {
        for &(_, pb) in &self.fds[slot].ptr_blocks {
            if pb < self.desc.geo.ptr_pages {
                set_bit(&mut self.pmap, u64::from(pb), false);
            }
        }
        for b in std::mem::take(&mut self.ptrs[slot]) {
            if b != 0 {
                self.pending_free.push(b);
            }
        }
        for s in std::mem::take(&mut self.fds[slot].cont)
            .into_iter()
            .map(|c| c as usize)
            .chain(std::iter::once(slot))
        {
            let generation = self.fds[s].generation;
            self.fds[s] = Fd {
                slot: s as u32,
                generation,
                ..Fd::default()
            };
        }
    }

    /// Grows `slot` to `new_len`: unless thin, with pointer blocks and zeroed data blocks; a
    /// thin file or redo log gets its pointer blocks as it gets data ([`Datastore::set_ptr`]).
    fn grow(&mut self, slot: usize, new_len: u64, allocate: bool) -> Result<()> {
        let g = self.desc.geo.clone();
        if new_len > g.max_file_size() {
            return Err(Error::Invalid(format!(
                "{new_len} bytes exceed the largest file of this datastore ({} bytes with {} \
                 blocks)",
                g.max_file_size(),
                g.block_size
            )));
        }
        let old_blocks = blocks_for(self.fds[slot].length, g.block_size) as usize;
        let new_blocks = blocks_for(new_len, g.block_size) as usize;
        let have = self.fds[slot].ptr_blocks.len();
        let need = new_blocks.div_ceil(PTRS_PER_BLOCK);
        // More than one descriptor's pointers: continuation slots.
        let pages = need.div_ceil(format::PB_PER_FD).max(1);
        while self.fds[slot].cont.len() + 1 < pages {
            let c = self.fds.iter().position(|f| !f.used).ok_or_else(|| {
                Error::NoSpace(format!(
                    "{new_len} bytes need {pages} file slots for their pointers; all {} are in use",
                    g.max_files
                ))
            })?;
            let generation = self.fds[c].generation + 1;
            let primary = (slot as u32, self.fds[slot].generation);
            self.fds[c] = Fd {
                slot: c as u32,
                used: true,
                flags: flags::CONT,
                generation,
                parent: Some(primary),
                ..Fd::default()
            };
            self.ptrs[c].clear();
            self.fds[slot].cont.push(c as u32);
        }
        self.fds[slot]
            .ptr_blocks
            .resize(need.max(have), (0, format::NO_BLOCK));
        self.ptrs[slot].resize(need.max(have) * PTRS_PER_BLOCK, 0);
        if allocate && new_blocks > old_blocks {
            let blocks = self.alloc_blocks((new_blocks - old_blocks) as u64)?;
            self.zero_blocks(&blocks)?;
            for (i, b) in (old_blocks..new_blocks).zip(blocks) {
                self.set_ptr(slot, i, b)?;
            }
        }
        self.fds[slot].length = new_len;
        self.fds[slot].modified = now();
        Ok(())
    }

    // ---- files ----

    pub(crate) fn slot_of(&self, name: &str) -> Result<usize> {
        self.fds
            .iter()
            .position(|f| is_file(f) && f.name == name)
            .ok_or_else(|| Error::NotFound(format!("no file named '{name}' in the datastore")))
    }

    /// The byte whose host lock stands for file `slot`.
    pub(crate) fn lock_byte(&self, slot: usize) -> u64 {
        self.desc.geo.fd_page(slot as u32) * PAGE as u64
    }

    fn check_size(size: u64) -> Result<()> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(Error::Invalid(format!(
                "size {size}: a positive multiple of 512 bytes"
            )));
        }
        Ok(())
    }

    /// Creates file `name` of `size` bytes, all blocks allocated and zeroed unless `thin`.
    pub fn create(&mut self, name: &str, size: u64, thin: bool) -> Result<FileInfo> {
        check_name(name, false)?;
        if name.len() > format::MAX_NAME - 8 {
            return Err(Error::Invalid(format!(
                "file name '{name}': at most {} bytes (snapshots add '@N')",
                format::MAX_NAME - 8
            )));
        }
        Datastore::check_size(size)?;
        self.txn(|ds| {
            if ds.slot_of(name).is_ok() {
                return Err(Error::Exists(format!(
                    "a file named '{name}' exists already"
                )));
            }
            let slot = ds.fds.iter().position(|f| !f.used).ok_or_else(|| {
                Error::NoSpace(format!(
                    "all {} file slots are in use",
                    ds.desc.geo.max_files
                ))
            })?;
            let generation = ds.fds[slot].generation + 1;
            ds.fds[slot] = Fd {
                slot: slot as u32,
                used: true,
                flags: if thin { flags::THIN } else { 0 },
                generation,
                created: now(),
                name: name.to_string(),
                ..Fd::default()
            };
            ds.ptrs[slot].clear();
            ds.grow(slot, size, !thin)?;
            Ok(ds.info_of(slot))
        })
    }

    pub(crate) fn in_use(&self, slot: usize) -> Error {
        let fd = &self.fds[slot];
        match &fd.owner {
            Some(o) if o.handover.is_some() => Error::InUse(format!(
                "'{}' is being handed over to pid {} on {} (a live migration)",
                fd.name, o.pid, o.host
            )),
            Some(o) => Error::InUse(format!(
                "'{}' is open for writing by pid {} on {} since {}",
                fd.name, o.pid, o.host, o.since
            )),
            None => Error::InUse(format!("'{}' is open (for reading) elsewhere", fd.name)),
        }
    }

    /// The chain of `slot`: itself, then each parent.
    pub(crate) fn chain(&self, slot: usize) -> Vec<usize> {
        let mut v = vec![slot];
        let mut s = slot;
        while let Some((p, _)) = self.fds[s].parent {
            if v.contains(&(p as usize)) || v.len() > self.fds.len() {
                break;
            }
            v.push(p as usize);
            s = p as usize;
        }
        v
    }

    fn child_of(&self, slot: usize) -> Option<usize> {
        self.fds.iter().position(|f| {
            is_file(f)
                && f.parent
                    .is_some_and(|(p, g)| p as usize == slot && g == self.fds[slot].generation)
        })
    }

    /// Runs `f` on file `name` in one transaction, its whole chain locked: fails when anyone
    /// has one of them open, or a crashed owner's record is still there.
    fn file_op<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Datastore, usize) -> Result<T>,
    ) -> Result<T> {
        self.reload()?;
        let slot = self.slot_of(name)?;
        if self.fds[slot].flags & flags::FROZEN != 0 {
            let child = self
                .child_of(slot)
                .map_or("?".into(), |c| self.fds[c].name.clone());
            return Err(Error::ReadOnly(format!(
                "'{name}' is the frozen base of redo log '{child}': work on '{child}' \
                 (commit, revert or rm)"
            )));
        }
        // Every file of the chain that the operation may change locked: nobody may have any of
        // them open (a parent other redo logs branch from is left alone: it does not change).
        let mut held = Vec::new();
        let mut r = Ok(());
        for s in self.own_chain(slot) {
            let at = self.lock_byte(s);
            match self.dev.lock(at, LockKind::Exclusive, false) {
                Ok(true) => held.push(at),
                Ok(false) => r = Err(self.in_use(s)),
                Err(e) => r = Err(io("locking the file")(e)),
            }
            if r.is_ok() {
                if let Some(o) = &self.fds[s].owner {
                    r = Err(stale(&self.fds[s].name, o));
                }
            }
            if r.is_err() {
                break;
            }
        }
        let r = r.and_then(|()| {
            self.txn(|ds| {
                // The transaction may have reloaded: find the file again.
                let slot = ds.slot_of(name)?;
                f(ds, slot)
            })
        });
        for at in held {
            let _ = self.dev.unlock(at);
        }
        r
    }

    /// Removes file `name` (with the frozen parents of its redo-log chain that no other redo
    /// log branches from).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.file_op(name, |ds, slot| {
            for s in ds.own_chain(slot) {
                ds.free_file(s);
            }
            Ok(())
        })
    }

    /// Grows file `name` to `size` bytes.
    pub fn resize(&mut self, name: &str, size: u64) -> Result<FileInfo> {
        Datastore::check_size(size)?;
        self.file_op(name, |ds, slot| {
            let len = ds.fds[slot].length;
            if size < len {
                return Err(Error::Invalid(format!(
                    "'{name}' is {len} bytes: shrinking to {size} would lose data and is not supported"
                )));
            }
            let thin = ds.fds[slot].flags & (flags::THIN | flags::REDO) != 0;
            ds.grow(slot, size, !thin)?;
            Ok(ds.info_of(slot))
        })
    }

    /// Starts a redo log on `name`: the file becomes its frozen parent `name@N` and a new,
    /// empty redo log takes the name. Constant time: no data is copied.
    pub fn snapshot(&mut self, name: &str) -> Result<FileInfo> {
        self.file_op(name, |ds, slot| {
            let new = ds.start_redo(slot, name)?;
            Ok(ds.info_of(new))
        })
    }

    /// In the running transaction: file `slot` (named `name`) becomes frozen `name@N` and a
    /// new, empty redo log in a free slot takes the name; returns that slot.
    pub(crate) fn start_redo(&mut self, slot: usize, name: &str) -> Result<usize> {
        let depth = self.chain(slot).len();
        let mut frozen = format!("{name}@{depth}");
        let mut k = depth;
        while self.slot_of(&frozen).is_ok() {
            k += 1;
            frozen = format!("{name}@{k}");
        }
        let new = self
            .fds
            .iter()
            .position(|f| !f.used)
            .ok_or_else(|| Error::NoSpace("no free file slot for the redo log".into()))?;
        let parent = &mut self.fds[slot];
        parent.name = frozen;
        parent.flags |= flags::FROZEN;
        parent.modified = now();
        let (len, pgen) = (parent.length, parent.generation);
        self.new_redo(new, slot, pgen, len, name.to_string())?;
        Ok(new)
    }

    /// In the running transaction: an empty redo log named `name` in free slot `new`, on
    /// parent `slot` (of generation `pgen`) `len` bytes long.
    fn new_redo(
        &mut self,
        new: usize,
        slot: usize,
        pgen: u64,
        len: u64,
        name: String,
    ) -> Result<()> {
        let generation = self.fds[new].generation + 1;
        self.fds[new] = Fd {
            slot: new as u32,
            used: true,
            flags: flags::REDO | flags::THIN,
            generation,
            parent: Some((slot as u32, pgen)),
            created: now(),
            name,
            ..Fd::default()
        };
        self.ptrs[new].clear();
        self.grow(new, len, false)
    }

    /// Starts a new redo log on the frozen file `frozen` (a branch): `name`, or unless given
    /// the first free `FROZEN+rK` (K = 1, 2, ...). A frozen file may have any number of redo
    /// logs; each reads what the frozen file holds until written. One transaction, constant
    /// time. Used to restore or clone a snapshot's disk while its source runs on.
    pub fn branch(&mut self, frozen: &str, name: Option<&str>) -> Result<FileInfo> {
        self.reload()?;
        self.txn(|ds| {
            let slot = ds.new_branch(frozen, name)?;
            Ok(ds.info_of(slot))
        })
    }

    /// In the running transaction: the branch of [`Datastore::branch`]; returns its slot.
    pub(crate) fn new_branch(&mut self, frozen: &str, name: Option<&str>) -> Result<usize> {
        let p = self.slot_of(frozen)?;
        if self.fds[p].flags & flags::FROZEN == 0 {
            return Err(Error::Invalid(format!(
                "'{frozen}' is not frozen: a branch starts from a snapshot's frozen file                  (NAME@N, made by `wv fs snapshot`)"
            )));
        }
        let name = match name {
            Some(n) => {
                check_name(n, false)?;
                n.to_string()
            }
            None => (1u32..)
                .map(|k| format!("{frozen}+r{k}"))
                .find(|n| self.slot_of(n).is_err())
                .unwrap_or_default(),
        };
        if name.len() > format::MAX_NAME - 8 {
            return Err(Error::Invalid(format!(
                "file name '{name}': at most {} bytes (snapshots add '@N')",
                format::MAX_NAME - 8
            )));
        }
        if self.slot_of(&name).is_ok() {
            return Err(Error::Exists(format!(
                "a file named '{name}' exists already"
            )));
        }
        let new = self
            .fds
            .iter()
            .position(|f| !f.used)
            .ok_or_else(|| Error::NoSpace("no free file slot for the redo log".into()))?;
        let (len, pgen) = (self.fds[p].length, self.fds[p].generation);
        self.new_redo(new, p, pgen, len, name)?;
        Ok(new)
    }

    /// The redo logs whose parent is `slot`.
    pub(crate) fn children_of(&self, slot: usize) -> Vec<usize> {
        (0..self.fds.len())
            .filter(|&c| {
                is_file(&self.fds[c])
                    && self.fds[c]
                        .parent
                        .is_some_and(|(p, g)| p as usize == slot && g == self.fds[slot].generation)
            })
            .collect()
    }

    /// The part of `slot`'s chain that is its alone: itself, then each parent as long as the
    /// file below it is that parent's only redo log. A parent with other branches stays.
    pub(crate) fn own_chain(&self, slot: usize) -> Vec<usize> {
        let chain = self.chain(slot);
        let mut v = vec![slot];
        for w in chain.windows(2) {
            if self.children_of(w[1]) != [w[0]] {
                break;
            }
            v.push(w[1]);
        }
        v
    }

    fn redo_parent(&self, slot: usize, name: &str) -> Result<usize> {
        match self.fds[slot].parent {
            Some((p, _)) if self.fds[slot].flags & flags::REDO != 0 => Ok(p as usize),
            _ => Err(Error::Invalid(format!(
                "'{name}' is not a redo log: nothing to merge or drop"
            ))),
        }
    }

    /// Merges redo log `name` into its parent (pointer by pointer, no data copied), which
    /// takes the name back.
    pub fn commit_redo(&mut self, name: &str) -> Result<FileInfo> {
        self.file_op(name, |ds, slot| {
            let parent = ds.redo_parent(slot, name)?;
            let others: Vec<String> = ds
                .children_of(parent)
                .into_iter()
                .filter(|&c| c != slot)
                .map(|c| ds.fds[c].name.clone())
                .collect();
            if !others.is_empty() {
                return Err(Error::Invalid(format!(
                    "'{}' has other redo logs ({}): committing '{name}' into it would change what they read; remove them first, or keep '{name}' as it is",
                    ds.fds[parent].name,
                    others.join(", ")
                )));
            }
            let len = ds.fds[slot].length;
            let thin = ds.fds[parent].flags & (flags::THIN | flags::REDO) != 0;
            if len > ds.fds[parent].length {
                // A preallocated parent gets its new blocks first; frees come last.
                ds.grow(parent, len, !thin)?;
            }
            let n = blocks_for(len, ds.desc.geo.block_size) as usize;
            for i in 0..n {
                let b = ds.ptrs[slot][i];
                if b != 0 {
                    let old = ds.ptrs[parent][i];
                    ds.set_ptr(parent, i, b)?;
                    if old != 0 {
                        ds.pending_free.push(old);
                    }
                    ds.ptrs[slot][i] = 0;
                }
            }
            Ok(ds.drop_redo(slot, parent, name))
        })
    }

    /// Frees redo log `slot`; its `parent` thaws and takes the name back.
    fn drop_redo(&mut self, slot: usize, parent: usize, name: &str) -> FileInfo {
        self.free_file(slot);
        let p = &mut self.fds[parent];
        p.name = name.to_string();
        p.flags &= !flags::FROZEN;
        p.modified = now();
        self.info_of(parent)
    }

    /// Drops redo log `name`: its parent takes the name back, as it was at the snapshot. When
    /// other redo logs branch from the parent, it stays frozen under its own name (the answer
    /// is then the parent's).
    pub fn revert(&mut self, name: &str) -> Result<FileInfo> {
        self.file_op(name, |ds, slot| {
            let parent = ds.redo_parent(slot, name)?;
            if ds.children_of(parent).len() > 1 {
                ds.free_file(slot);
                return Ok(ds.info_of(parent));
            }
            Ok(ds.drop_redo(slot, parent, name))
        })
    }

    /// Breaks the lock record a crashed owner left on `name`; refuses while the owner lives.
    pub fn unlock(&mut self, name: &str) -> Result<()> {
        self.reload()?;
        let slot = self.slot_of(name)?;
        let at = self.lock_byte(slot);
        if self.fds[slot].owner.is_none() {
            return Err(Error::Invalid(format!("'{name}' has no lock record")));
        }
        if !self
            .dev
            .lock(at, LockKind::Exclusive, false)
            .map_err(io("locking the file"))?
        {
            return Err(self.in_use(slot));
        }
        let r = self.txn(|ds| {
            let slot = ds.slot_of(name)?;
            ds.fds[slot].owner = None;
            Ok(())
        });
        let _ = self.dev.unlock(at);
        r
    }

    /// The owner record of a writer in this process ([`owner_pid`]).
    pub(crate) fn owner_record(&self) -> Owner {
        Owner {
            host: self.host.clone(),
            pid: owner_pid(),
            since: now(),
            handover: None,
        }
    }

    /// Records (or clears) the writer of `slot`.
    pub(crate) fn set_owner(&mut self, slot: usize, owner: bool) -> Result<()> {
        let host = self.host.clone();
        let generation = self.fds[slot].generation;
        self.txn(|ds| {
            if !ds.fds[slot].used || ds.fds[slot].generation != generation {
                return Err(Error::NotFound("the file was removed".into()));
            }
            ds.fds[slot].owner = owner.then(|| Owner {
                host,
                pid: owner_pid(),
                since: now(),
                handover: None,
            });
            Ok(())
        })
    }

    pub(crate) fn info_of(&self, slot: usize) -> FileInfo {
        let fd = &self.fds[slot];
        let allocated = self.ptrs[slot].iter().filter(|&&b| b != 0).count() as u64;
        FileInfo {
            name: fd.name.clone(),
            size: fd.length,
            allocated: allocated * self.desc.geo.block_size,
            kind: if fd.flags & flags::REDO != 0 {
                "redo-log"
            } else if fd.flags & flags::THIN != 0 {
                "thin"
            } else {
                "preallocated"
            }
            .into(),
            frozen: fd.flags & flags::FROZEN != 0,
            parent: fd
                .parent
                .and_then(|(p, _)| self.fds.get(p as usize))
                .map(|p| p.name.clone()),
            owner: fd.owner.as_ref().map(|o| match o.handover {
                None => format!("pid {} on {} since {}", o.pid, o.host, o.since),
                Some(_) => format!(
                    "pid {} on {} (handed over since {}, not taken yet)",
                    o.pid, o.host, o.since
                ),
            }),
            created: fd.created,
        }
    }

    /// Every file (after catching up with other handles' changes).
    pub fn list(&mut self) -> Result<Vec<FileInfo>> {
        self.reload()?;
        Ok((0..self.fds.len())
            .filter(|&s| is_file(&self.fds[s]))
            .map(|s| self.info_of(s))
            .collect())
    }

    /// One file (after catching up with other handles' changes).
    pub fn stat(&mut self, name: &str) -> Result<FileInfo> {
        self.reload()?;
        Ok(self.info_of(self.slot_of(name)?))
    }

    /// The datastore's summary (after catching up with other handles' changes).
    pub fn info(&mut self) -> Result<Info> {
        self.reload()?;
        Ok(self.summary())
    }

    /// The summary as this handle last saw it.
    pub fn summary(&self) -> Info {
        let g = &self.desc.geo;
        Info {
            uuid: uuid_string(&self.desc.uuid),
            label: self.desc.label.clone(),
            version: format::VERSION,
            block_size: g.block_size,
            size: g.total_blocks * g.block_size,
            data_blocks: g.data_blocks(),
            free_blocks: self.free_blocks(),
            metadata_bytes: g.first_data_block() * g.block_size,
            files: self.fds.iter().filter(|f| is_file(f)).count() as u32,
            max_files: g.max_files,
            max_file_size: g.max_file_size(),
            transaction: self.desc.seq,
            cached_metadata_bytes: self.cached_bytes(),
        }
    }

    /// Memory the cached metadata takes: decoded pointers and maps, plus the page images kept
    /// to write only what changed.
    pub fn cached_bytes(&self) -> u64 {
        let ptrs: usize = self.ptrs.iter().map(|v| v.capacity() * 4).sum();
        let fds = self.fds.len() * std::mem::size_of::<Fd>();
        let maps = (self.dmap.len() + self.pmap.len()) * 8;
        let cache = self.cache.len() * (PAGE + 32);
        (ptrs + fds + maps + cache) as u64
    }

    /// Checks the whole datastore; with `repair`, rewrites the metadata from what is intact
    /// (maps rebuilt, damaged slots freed, bad pointers dropped, the descriptor restored).
    pub fn check(dev: Arc<dyn Dev>, repair: bool) -> Result<Report> {
        dev.lock(0, LockKind::Exclusive, true)
            .map_err(io("locking the datastore's metadata"))?;
        let r = Datastore::check_locked(dev.clone(), repair);
        let _ = dev.unlock(0);
        r
    }

    fn check_locked(dev: Arc<dyn Dev>, repair: bool) -> Result<Report> {
        let (mut ds, mut report) = Datastore::load(dev, Mode::Lenient)?;
        let g = ds.desc.geo.clone();
        // Maps from the files.
        let mut dmap = vec![0u64; ds.dmap.len()];
        let mut pmap = vec![0u64; ds.pmap.len()];
        for b in 0..g.first_data_block() {
            set_bit(&mut dmap, b, true);
        }
        let mut owner_of: HashMap<u32, String> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut pb_owner: HashMap<u32, String> = HashMap::new();
        for slot in 0..ds.fds.len() {
            if !is_file(&ds.fds[slot]) {
                continue;
            }
            let name = ds.fds[slot].name.clone();
            if let Some(other) = names.insert(name.clone(), slot) {
                report.problems.push(format!(
                    "two files are named '{name}' (slots {other} and {slot})"
                ));
                if repair {
                    ds.fds[slot].name = format!("{name}@dup{slot}");
                }
            }
            for (i, pb) in ds.fds[slot].ptr_blocks.clone().into_iter().enumerate() {
                if pb.1 == format::NO_BLOCK {
                    continue;
                }
                if let Some(o) = pb_owner.insert(pb.1, name.clone()) {
                    report.problems.push(format!(
                        "pointer block {} is used by '{o}' and '{name}'",
                        pb.1
                    ));
                    // Its pointers are dropped: the later file's blocks there are lost.
                    ds.fds[slot].ptr_blocks[i].1 = format::NO_BLOCK;
                    let range = i * PTRS_PER_BLOCK..(i + 1) * PTRS_PER_BLOCK;
                    ds.ptrs[slot][range].fill(0);
                } else {
                    set_bit(&mut pmap, u64::from(pb.1), true);
                }
            }
            for i in 0..ds.ptrs[slot].len() {
                let b = ds.ptrs[slot][i];
                if b == 0 {
                    continue;
                }
                if let Some(o) = owner_of.get(&b) {
                    report.problems.push(format!(
                        "block {b} belongs to both '{o}' and '{name}' (dropped from '{name}')"
                    ));
                    ds.ptrs[slot][i] = 0;
                } else {
                    owner_of.insert(b, name.clone());
                    set_bit(&mut dmap, u64::from(b), true);
                }
            }
            let fd = ds.fds[slot].clone();
            if fd.flags & flags::FROZEN != 0 && ds.child_of(slot).is_none() {
                report
                    .problems
                    .push(format!("'{name}' is frozen but has no redo log"));
                ds.fds[slot].flags &= !flags::FROZEN;
            }
            if let Some((p, _)) = fd.parent {
                if ds.fds[p as usize].flags & flags::FROZEN == 0 {
                    report
                        .problems
                        .push(format!("the parent of redo log '{name}' is not frozen"));
                    ds.fds[p as usize].flags |= flags::FROZEN;
                }
            }
            if let Some(o) = &ds.fds[slot].owner {
                let held = ds.dev.locked_by_other(ds.lock_byte(slot)).unwrap_or(true);
                if !held {
                    let what = if o.handover.is_some() {
                        "hand-over record (a live migration's target, "
                    } else {
                        "lock record ("
                    };
                    report.notes.push(format!(
                        "'{name}' has a stale {what}pid {} on {} since {}): `wv fs unlock` breaks it",
                        o.pid, o.host, o.since
                    ));
                }
            }
        }
        for (kind, have, want) in [
            ("block", &ds.dmap, &dmap),
            ("pointer-block", &ds.pmap, &pmap),
        ] {
            let (mut leaked, mut lost) = (0u64, 0u64);
            for (h, w) in have.iter().zip(want.iter()) {
                leaked += u64::from((h & !w).count_ones());
                lost += u64::from((w & !h).count_ones());
            }
            if leaked > 0 {
                report.problems.push(format!(
                    "{leaked} {kind}s are marked in use but no file has them"
                ));
            }
            if lost > 0 {
                report
                    .problems
                    .push(format!("{lost} {kind}s in use are marked free"));
            }
        }
        if repair && !report.problems.is_empty() {
            ds.dmap = dmap;
            ds.pmap = pmap;
            // Rewrite every page (the descriptor included) through the journal.
            ds.cache.clear();
            ds.commit(None)?;
            ds.dev
                .write_at(&ds.desc.encode()[..], PAGE as u64)
                .map_err(io("restoring the descriptor's copy"))?;
            ds.dev.flush().map_err(io("flushing"))?;
            report.repaired = true;
        }
        Ok(report)
    }
}

pub(crate) fn stale(name: &str, o: &Owner) -> Error {
    if o.handover.is_some() {
        return Error::StaleLock(format!(
            "'{name}' was handed over (a live migration) to pid {} on {} (since {}), which has \
             not taken it: the migration is in progress or its target crashed; `wv fs unlock` \
             breaks it",
            o.pid, o.host, o.since
        ));
    }
    Error::StaleLock(format!(
        "'{name}' has a lock record from pid {} on {} (since {}) that no running process holds: \
         the owner crashed or the disk is open on another host; `wv fs unlock` breaks it",
        o.pid, o.host, o.since
    ))
}

static OWNER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Records `pid` instead of this process's own as the writer in owner records: a jailed VMM
/// is pid 1 of its namespace, and the host knows it by its keeper's (what `wv host` lists).
pub fn set_owner_pid(pid: u32) {
    OWNER_PID.store(pid, std::sync::atomic::Ordering::Relaxed);
}

/// The pid owner records name: [`set_owner_pid`]'s, else this process's.
fn owner_pid() -> u32 {
    match OWNER_PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::process::id(),
        p => p,
    }
}
