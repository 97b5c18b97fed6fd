//! An open virtual disk: the data path. Reads and writes map guest offsets to data blocks
//! through the cached pointers; a preallocated disk touches no metadata. A write to a hole (a
//! thin disk's unwritten block, a redo log's block not yet copied) allocates a block, fills it
//! (zeros, or the parent's data) and commits the pointer in one transaction after the data.
//!
//! Opening for writing takes the file's host lock exclusively and records the owner in the
//! datastore; opening for reading takes it shared. Parents of a redo log are held shared.
//!
//! The writer of a disk can freeze it without closing it ([`Disk::freeze`]: what `snapshot`
//! does, with the open handle and its owner record moving to the new redo log in the same
//! transaction), and a new disk can be opened as a new branch of a frozen file
//! ([`Datastore::open_branch`]: created and owned in one transaction).

use crate::dev::LockKind;
use crate::format::flags;
use crate::fs::{blocks_for, Datastore, FileInfo};
use crate::{io, Error, Result};

/// A virtual disk open for reading or writing.
pub struct Disk {
    ds: Datastore,
    slot: usize,
    chain: Vec<usize>,
    writable: bool,
    locks: Vec<u64>,
    name: String,
}

impl Datastore {
    /// Opens file `name` for reading, or for writing (exclusive: one writer; a frozen parent
    /// cannot be written). The disk has its own handle on the device.
    pub fn open_disk(&self, name: &str, writable: bool) -> Result<Disk> {
        let dev = self.dev.reopen().map_err(io("reopening the datastore"))?;
        let ds = Datastore::open(dev)?;
        let slot = ds.slot_of(name)?;
        if writable && ds.fds[slot].flags & flags::FROZEN != 0 {
            return Err(Error::ReadOnly(format!(
                "'{name}' is the frozen base of a redo log and opens read-only"
            )));
        }
        let chain = ds.chain(slot);
        let mut disk = Disk {
            ds,
            slot,
            chain: chain.clone(),
            writable: false,
            locks: Vec::new(),
            name: name.to_string(),
        };
        for (i, &s) in chain.iter().enumerate() {
            let kind = if i == 0 && writable {
                LockKind::Exclusive
            } else {
                LockKind::Shared
            };
            let at = disk.ds.lock_byte(s);
            if !disk
                .ds
                .dev
                .lock(at, kind, false)
                .map_err(io("locking the file"))?
            {
                return Err(disk.ds.in_use(s));
            }
            disk.locks.push(at);
        }
        if writable {
            if let Some(o) = &disk.ds.fds[slot].owner {
                return Err(crate::fs::stale(name, o));
            }
            disk.ds.set_owner(slot, true)?;
            disk.writable = true;
        }
        Ok(disk)
    }
}

impl Datastore {
    /// Creates a new redo log on the frozen file `frozen` (named `name`, or `FROZEN+rK`: see
    /// [`Datastore::branch`]) and opens it for writing, in one transaction: the branch never
    /// exists without its owner, so a crash leaves either no branch or one with a stale owner
    /// record. The frozen file and its parents are held shared, as for any redo log.
    pub fn open_branch(&self, frozen: &str, name: Option<&str>) -> Result<Disk> {
        let dev = self.dev.reopen().map_err(io("reopening the datastore"))?;
        let ds = Datastore::open(dev)?;
        let parent = ds.slot_of(frozen)?;
        let pgen = ds.fds[parent].generation;
        let parents = ds.chain(parent);
        // Until it is a disk, an unwritable one that drops its locks on error.
        let mut disk = Disk {
            ds,
            slot: parent,
            chain: Vec::new(),
            writable: false,
            locks: Vec::new(),
            name: frozen.to_string(),
        };
        for &s in &parents {
            let at = disk.ds.lock_byte(s);
            if !disk
                .ds
                .dev
                .lock(at, LockKind::Shared, false)
                .map_err(io("locking the file"))?
            {
                return Err(disk.ds.in_use(s));
            }
            disk.locks.push(at);
        }
        let mut locked = None;
        let r = disk.ds.txn(|ds| {
            // Still the file whose chain is locked (it cannot change once held shared).
            if ds.slot_of(frozen).ok() != Some(parent) || ds.fds[parent].generation != pgen {
                return Err(Error::NotFound(format!(
                    "'{frozen}' changed while it was being opened"
                )));
            }
            let new = ds.new_branch(frozen, name)?;
            let at = ds.lock_byte(new);
            if !ds
                .dev
                .lock(at, LockKind::Exclusive, false)
                .map_err(io("locking the file"))?
            {
                return Err(ds.in_use(new));
            }
            locked = Some(at);
            ds.fds[new].owner = Some(ds.owner_record());
            Ok(new)
        });
        match r {
            Ok(new) => {
                let at = locked.unwrap_or_default();
                disk.locks.insert(0, at);
                disk.chain = disk.ds.chain(new);
                disk.name = disk.ds.fds[new].name.clone();
                disk.slot = new;
                disk.writable = true;
                Ok(disk)
            }
            Err(e) => {
                if let Some(at) = locked {
                    let _ = disk.ds.dev.unlock(at);
                }
                Err(e)
            }
        }
    }
}

/// A disk about to be handed over to this process (the target of a live migration): the file
/// is found and checked and its frozen parents are held shared (as its writer holds them), but
/// it is neither locked for writing nor written until [`Pending::take`].
pub struct Pending {
    /// Not writable until taken: its locks are the parents' (shared).
    disk: Disk,
    generation: u64,
}

impl Datastore {
    /// Prepares to take file `name` over from its writer (see [`Disk::hand_over`]): fails if
    /// it does not exist or is frozen. Nothing is written.
    pub fn prepare_take_over(&self, name: &str) -> Result<Pending> {
        let dev = self.dev.reopen().map_err(io("reopening the datastore"))?;
        let ds = Datastore::open(dev)?;
        let slot = ds.slot_of(name)?;
        if ds.fds[slot].flags & flags::FROZEN != 0 {
            return Err(Error::ReadOnly(format!(
                "'{name}' is the frozen base of a redo log and opens read-only"
            )));
        }
        let chain = ds.chain(slot);
        let generation = ds.fds[slot].generation;
        let mut disk = Disk {
            ds,
            slot,
            chain: chain.clone(),
            writable: false,
            locks: Vec::new(),
            name: name.to_string(),
        };
        for &s in &chain[1..] {
            let at = disk.ds.lock_byte(s);
            if !disk
                .ds
                .dev
                .lock(at, LockKind::Shared, false)
                .map_err(io("locking the file"))?
            {
                return Err(disk.ds.in_use(s));
            }
            disk.locks.push(at);
        }
        Ok(Pending { disk, generation })
    }
}

impl Pending {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.disk.len()
    }

    /// Whether the file has no bytes (never: files have a positive size).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the file over once its writer has handed it over with `token`: locks it
    /// exclusively (retrying until `wait` has passed, as a process that looks at the file may
    /// hold its lock for a moment), checks that its owner record is a hand-over with that
    /// token, and replaces the record by this process's in one transaction. Anything else
    /// (the writer still holds it, another record, the file replaced) is refused and nothing
    /// is changed.
    pub fn take(self, token: u64, wait: std::time::Duration) -> Result<Disk> {
        let Pending {
            mut disk,
            generation,
        } = self;
        let slot = disk.slot;
        let at = disk.ds.lock_byte(slot);
        let deadline = std::time::Instant::now() + wait;
        loop {
            if disk
                .ds
                .dev
                .lock(at, LockKind::Exclusive, false)
                .map_err(io("locking the file"))?
            {
                break;
            }
            if std::time::Instant::now() >= deadline {
                disk.ds.reload()?;
                return Err(disk.ds.in_use(slot));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        disk.locks.insert(0, at);
        let name = disk.name.clone();
        let me = disk.ds.owner_record();
        disk.ds.txn(|ds| {
            if !ds.fds[slot].used || ds.fds[slot].generation != generation {
                return Err(Error::NotFound(format!("'{name}' was removed")));
            }
            match &ds.fds[slot].owner {
                Some(o) if o.handover == Some(token) => {}
                Some(o) => {
                    return Err(Error::InUse(format!(
                        "'{name}' was not handed over to this process: its owner record names \
                         pid {} on {}{}",
                        o.pid,
                        o.host,
                        if o.handover.is_some() {
                            " (a hand-over with another token)"
                        } else {
                            ""
                        }
                    )))
                }
                None => {
                    return Err(Error::InUse(format!(
                        "'{name}' was not handed over to this process: it has no owner record"
                    )))
                }
            }
            ds.fds[slot].owner = Some(me);
            Ok(())
        })?;
        disk.writable = true;
        Ok(disk)
    }
}

impl Disk {
    /// Hands the disk over to another process (a live migration's target, pid `pid` on
    /// `host`) without a moment when nobody owns it: flushes every write, then in one
    /// transaction replaces this writer's owner record by a hand-over record naming the target
    /// and carrying `token`, then releases the locks. From then on only a process given the
    /// token can take the file ([`Pending::take`], which makes the record its own); anyone else
    /// sees a stale record naming the target, as if the target had crashed. On success this
    /// handle holds nothing any more (drop it); on failure the disk is unchanged.
    pub fn hand_over(&mut self, host: &str, pid: u32, token: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "'{}' is open read-only",
                self.name
            )));
        }
        self.flush()?;
        let (slot, name) = (self.slot, self.name.clone());
        let generation = self.ds.fds[slot].generation;
        let host: String = host.chars().take(64).collect();
        let r = self.ds.txn(|ds| {
            if !ds.fds[slot].used || ds.fds[slot].generation != generation {
                return Err(Error::NotFound(format!("'{name}' was removed")));
            }
            ds.fds[slot].owner = Some(crate::format::Owner {
                host,
                pid,
                since: crate::fs::now(),
                handover: Some(token),
            });
            Ok(())
        });
        r?;
        // The record is the target's now: nothing here clears it, and the locks go.
        self.writable = false;
        for at in std::mem::take(&mut self.locks) {
            let _ = self.ds.dev.unlock(at);
        }
        Ok(())
    }

    /// Freezes the disk while it stays open (what `snapshot` does, by its writer): in one
    /// transaction its contents become the frozen file `NAME@N`, a new empty redo log takes
    /// the name, and this handle, its exclusive lock and its owner record move to the redo
    /// log; the frozen file stays held shared. Returns the frozen file's name. Writes made
    /// before are in the frozen file; writes after go to the redo log.
    pub fn freeze(&mut self) -> Result<String> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "'{}' is open read-only: only its writer can freeze it",
                self.name
            )));
        }
        let (slot, name) = (self.slot, self.name.clone());
        let generation = self.ds.fds[slot].generation;
        let mut locked = None;
        let r = self.ds.txn(|ds| {
            if !ds.fds[slot].used || ds.fds[slot].generation != generation {
                return Err(Error::NotFound(format!("'{name}' was removed")));
            }
            let new = ds.start_redo(slot, &name)?;
            let at = ds.lock_byte(new);
            if !ds
                .dev
                .lock(at, LockKind::Exclusive, false)
                .map_err(io("locking the file"))?
            {
                return Err(ds.in_use(new));
            }
            locked = Some(at);
            ds.fds[new].owner = ds.fds[slot].owner.take();
            Ok((new, ds.fds[slot].name.clone()))
        });
        match r {
            Ok((new, frozen)) => {
                // The frozen file is now held as any parent is: shared (an atomic downgrade).
                let _ = self.ds.dev.lock(self.locks[0], LockKind::Shared, false);
                self.locks.insert(0, locked.unwrap_or_default());
                self.chain.insert(0, new);
                self.slot = new;
                Ok(frozen)
            }
            Err(e) => {
                if let Some(at) = locked {
                    let _ = self.ds.dev.unlock(at);
                }
                Err(e)
            }
        }
    }

    /// Undoes [`Disk::freeze`] while nothing was written since (a snapshot that failed after
    /// freezing its disks): the empty redo log is dropped and the frozen file takes the name
    /// and this handle back. Refused once the redo log holds data or another redo log branches
    /// from the frozen file.
    pub fn unfreeze(&mut self) -> Result<()> {
        let (slot, name) = (self.slot, self.name.clone());
        let Some(&parent) = self.chain.get(1) else {
            return Err(Error::Invalid(format!("'{name}' is not a redo log")));
        };
        if self.ds.fds[slot].flags & flags::REDO == 0 {
            return Err(Error::Invalid(format!("'{name}' is not a redo log")));
        }
        // The parent back to exclusive first: nobody else may be reading it.
        let pat = self.locks[1];
        if !self
            .ds
            .dev
            .lock(pat, LockKind::Exclusive, false)
            .map_err(io("locking the file"))?
        {
            return Err(self.ds.in_use(parent));
        }
        let r = self.ds.txn(|ds| {
            if ds.ptrs[slot].iter().any(|&b| b != 0) {
                return Err(Error::Invalid(format!(
                    "'{name}' has been written since it was frozen"
                )));
            }
            if ds.children_of(parent) != [slot] {
                return Err(Error::InUse(format!(
                    "other redo logs branch from '{}'",
                    ds.fds[parent].name
                )));
            }
            let owner = ds.fds[slot].owner.take();
            ds.free_file(slot);
            let p = &mut ds.fds[parent];
            p.name = name.clone();
            p.flags &= !flags::FROZEN;
            p.owner = owner;
            Ok(())
        });
        match r {
            Ok(()) => {
                let _ = self.ds.dev.unlock(self.locks[0]);
                self.locks.remove(0);
                self.chain.remove(0);
                self.slot = parent;
                Ok(())
            }
            Err(e) => {
                let _ = self.ds.dev.lock(pat, LockKind::Shared, false);
                Err(e)
            }
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.ds.fds[self.slot].length
    }

    /// Whether the disk has no bytes (never: files have a positive size).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's name (a redo log's, after [`Disk::freeze`]: the name stays).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is open for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The file as `ls` shows it.
    pub fn info(&self) -> FileInfo {
        self.ds.info_of(self.slot)
    }

    /// The datastore handle this disk uses.
    pub fn datastore(&self) -> &Datastore {
        &self.ds
    }

    fn bounds(&self, off: u64, n: usize) -> Result<()> {
        match off.checked_add(n as u64) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{n} bytes at offset {off} are beyond the end of '{}' ({} bytes)",
                self.name,
                self.len()
            ))),
        }
    }

    /// Splits `[off, off+n)` into (block index, offset in block, range in the buffer).
    fn pieces(
        &self,
        off: u64,
        n: usize,
    ) -> impl Iterator<Item = (usize, u64, std::ops::Range<usize>)> {
        let bs = self.ds.desc.geo.block_size;
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= n {
                return None;
            }
            let pos = off + done as u64;
            let within = pos % bs;
            let take = ((bs - within) as usize).min(n - done);
            let piece = ((pos / bs) as usize, within, done..done + take);
            done += take;
            Some(piece)
        })
    }

    /// The block holding block `bi` for the chain `levels` (0: none, reads as zeros).
    fn source(ds: &Datastore, levels: &[usize], bi: usize) -> u32 {
        for &s in levels {
            if bi as u64 >= blocks_for(ds.fds[s].length, ds.desc.geo.block_size) {
                return 0;
            }
            let b = ds.ptrs[s][bi];
            if b != 0 {
                return b;
            }
        }
        0
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.bounds(off, buf.len())?;
        let bs = self.ds.desc.geo.block_size;
        for (bi, within, r) in self.pieces(off, buf.len()) {
            match Disk::source(&self.ds, &self.chain, bi) {
                0 => buf[r].fill(0),
                b => self
                    .ds
                    .dev
                    .read_at(&mut buf[r], u64::from(b) * bs + within)
                    .map_err(|e| Error::Io(format!("reading '{}': {e}", self.name)))?,
            }
        }
        Ok(())
    }

    /// Writes `buf` at `off`. Durable once [`Disk::flush`] returns.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!(
                "'{}' is open read-only",
                self.name
            )));
        }
        self.bounds(off, buf.len())?;
        let bs = self.ds.desc.geo.block_size;
        let ptrs = &self.ds.ptrs[self.slot];
        if self.pieces(off, buf.len()).all(|(bi, _, _)| ptrs[bi] != 0) {
            // Every block is there: the common case of a preallocated disk.
            for (bi, within, r) in self.pieces(off, buf.len()) {
                let b = self.ds.ptrs[self.slot][bi];
                self.ds
                    .dev
                    .write_at(&buf[r], u64::from(b) * bs + within)
                    .map_err(|e| Error::Io(format!("writing '{}': {e}", self.name)))?;
            }
            return Ok(());
        }
        let (holes, mapped): (Vec<_>, Vec<_>) = self
            .pieces(off, buf.len())
            .partition(|(bi, _, _)| self.ds.ptrs[self.slot][*bi] == 0);
        if !holes.is_empty() {
            // All new blocks in one transaction, before anything is written: no space means
            // the write fails whole.
            let (slot, parents) = (self.slot, self.chain[1..].to_vec());
            self.ds.txn(|ds| {
                let new = ds.alloc_blocks(holes.len() as u64)?;
                for ((bi, within, r), nb) in holes.iter().cloned().zip(new) {
                    let at = u64::from(nb) * bs;
                    let piece = &buf[r];
                    match Disk::source(ds, &parents, bi) {
                        _ if piece.len() as u64 == bs => {}
                        0 => ds.dev.zero(at, bs).map_err(io("zeroing a new block"))?,
                        src => {
                            let mut full = vec![0u8; bs as usize];
                            ds.dev
                                .read_at(&mut full, u64::from(src) * bs)
                                .map_err(io("reading the parent's block"))?;
                            full[within as usize..within as usize + piece.len()]
                                .copy_from_slice(piece);
                            ds.dev
                                .write_at(&full, at)
                                .map_err(io("copying the parent's block"))?;
                            ds.set_ptr(slot, bi, nb)?;
                            continue;
                        }
                    }
                    ds.dev
                        .write_at(piece, at + within)
                        .map_err(io("writing a new block"))?;
                    ds.set_ptr(slot, bi, nb)?;
                }
                Ok(())
            })?;
        }
        for (bi, within, r) in mapped {
            let b = self.ds.ptrs[self.slot][bi];
            self.ds
                .dev
                .write_at(&buf[r], u64::from(b) * bs + within)
                .map_err(|e| Error::Io(format!("writing '{}': {e}", self.name)))?;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.ds
            .dev
            .flush()
            .map_err(io(format!("flushing '{}'", self.name)))
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if self.writable {
            let _ = self.ds.dev.flush();
            let _ = self.ds.set_owner(self.slot, false);
        }
        for &at in &self.locks {
            let _ = self.ds.dev.unlock(at);
        }
    }
}
