//! A virtio-blk backend on a VMKFS virtual disk (`--disk vmkfs=DATASTORE:NAME`): the disk is
//! opened exclusively for writing (or shared, read-only) through the datastore's locks, and
//! closed by an exit hook (the VMM ends without dropping its devices), which clears its owner
//! record: only a VMM that dies leaves a stale lock. Data moves between guest memory and the
//! disk through one bounce buffer of at most 1 MiB ([`wv_virtio::block::CHUNK`]), kept for
//! the life of the disk, after checking that the request lies inside the disk.
//!
//! Snapshots (docs/SNAPSHOT.md): at the snapshot instant, with the VM paused, [`freeze_all`]
//! freezes every VMKFS disk the VMM holds for writing (the disk's contents become `NAME@N`, the
//! VM runs on in a new redo log that takes NAME, the open handle moving with it in one VMKFS
//! transaction) and the snapshot records the frozen files ([`FrozenDisk`], its `disks`
//! section); a restore opens a new branch of each frozen file ([`branch_disks`]), so any
//! number of restores and clones start from the same disk contents while the source runs on.
//!
//! Live migration with a shared datastore (docs/MIGRATION.md): the source, paused and
//! acknowledged, hands each writable disk over to the target ([`hand_over_all`]); the target,
//! which checked each disk before acknowledging ([`VmkfsDisk::incoming`]), takes them over after
//! `go` and before any vCPU runs ([`Taker::take`]).

use crate::error::VmmError;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wv_machine::GuestRam as GuestMemoryMmap;
use wv_virtio::block::{bounce_read, bounce_write};
use wv_vmkfs::{Datastore, FileDev};

/// A VMKFS disk the VM holds, as a snapshot sees it.
pub(crate) struct Held {
    /// The disk's id (`--disk ...,id=`).
    pub id: String,
    /// The datastore.
    pub path: PathBuf,
    /// Index in the configuration's disks.
    pub index: usize,
    disk: Arc<Mutex<Option<wv_vmkfs::Disk>>>,
}

impl Held {
    /// The file's name and size, None once closed.
    pub(crate) fn name_and_size(&self) -> Option<(String, u64)> {
        let g = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|d| (d.name().to_string(), d.len()))
    }
}

/// Closes a [`VmkfsDisk`] (its owner record cleared, its locks dropped); the device then gets
/// errors.
pub(crate) struct Closer(Arc<Mutex<Option<wv_vmkfs::Disk>>>);

impl Closer {
    pub(crate) fn close(self) {
        drop(self.0.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// A disk of a snapshot: the frozen file a restore branches from (the `disks` section).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrozenDisk {
    /// Index in the configuration's disks.
    pub index: usize,
    /// The disk's id.
    pub id: String,
    /// The datastore.
    pub datastore: PathBuf,
    /// The file the VM ran on when the snapshot was taken (it runs on there).
    pub name: String,
    /// The frozen file holding the disk as it was at the snapshot instant.
    pub frozen: String,
}

/// An open VMKFS disk.
pub struct VmkfsDisk {
    disk: Arc<Mutex<Option<wv_vmkfs::Disk>>>,
    size: u64,
    writable: bool,
    /// The bounce buffer (grown on demand, never past CHUNK).
    bounce: Vec<u8>,
}

fn other(e: wv_vmkfs::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl VmkfsDisk {
    /// Opens disk `name` of the datastore at `path`.
    pub fn open(path: &Path, name: &str, readonly: bool) -> Result<VmkfsDisk, VmmError> {
        let bad =
            |e: String| VmmError::Disk(format!("--disk vmkfs={}:{name}: {e}", path.display()));
        let dev = FileDev::open(path, readonly).map_err(|e| bad(e.to_string()))?;
        let ds = Datastore::open(Arc::new(dev)).map_err(|e| bad(e.to_string()))?;
        let disk = ds
            .open_disk(name, !readonly)
            .map_err(|e| bad(e.to_string()))?;
        Ok(VmkfsDisk::hold(disk))
    }

    /// Opens a new branch of the frozen file `frozen` of the datastore at `path`, for
    /// writing (created and owned in one transaction: [`wv_vmkfs::Datastore::open_branch`]).
    pub fn open_branch(path: &Path, frozen: &str) -> Result<VmkfsDisk, VmmError> {
        let bad = |e: String| {
            VmmError::Disk(format!(
                "a branch of {}:{frozen} (the snapshot's disk): {e}",
                path.display()
            ))
        };
        let dev = FileDev::open(path, false).map_err(|e| bad(e.to_string()))?;
        let ds = Datastore::open(Arc::new(dev)).map_err(|e| bad(e.to_string()))?;
        let disk = ds
            .open_branch(frozen, None)
            .map_err(|e| bad(e.to_string()))?;
        Ok(VmkfsDisk::hold(disk))
    }

    pub(crate) fn hold(disk: wv_vmkfs::Disk) -> VmkfsDisk {
        let (size, writable) = (disk.len(), disk.writable());
        let disk = Arc::new(Mutex::new(Some(disk)));
        let d = disk.clone();
        crate::at_exit(Box::new(move || {
            drop(d.lock().unwrap_or_else(|p| p.into_inner()).take());
        }));
        VmkfsDisk {
            disk,
            size,
            writable,
            bounce: Vec::new(),
        }
    }

    /// What closes this disk from elsewhere (a failed migration's target, before it removes
    /// the disk it copied).
    pub(crate) fn closer(&self) -> Closer {
        Closer(self.disk.clone())
    }

    /// The file's name in the datastore.
    pub fn name(&self) -> String {
        with(&self.disk, |d| Ok(d.name().to_string())).unwrap_or_default()
    }

    /// What a snapshot needs of it: None when read-only (nothing to freeze).
    pub(crate) fn held(&self, id: &str, path: &Path, index: usize) -> Option<Held> {
        self.writable.then(|| Held {
            id: id.to_string(),
            path: path.to_path_buf(),
            index,
            disk: self.disk.clone(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut wv_vmkfs::Disk) -> wv_vmkfs::Result<T>) -> io::Result<T> {
        with(&self.disk, f)
    }
}

fn with<T>(
    disk: &Mutex<Option<wv_vmkfs::Disk>>,
    f: impl FnOnce(&mut wv_vmkfs::Disk) -> wv_vmkfs::Result<T>,
) -> io::Result<T> {
    let mut g = disk.lock().unwrap_or_else(|p| p.into_inner());
    match g.as_mut() {
        Some(d) => f(d).map_err(other),
        None => Err(io::Error::other("the VMKFS disk was closed")),
    }
}

/// Freezes every disk of `held` (the VM is paused: nothing is in flight) and returns the
/// frozen files; if one fails, those already frozen are unfrozen and the error says which
/// disk failed.
pub(crate) fn freeze_all(held: &[Held]) -> Result<Vec<FrozenDisk>, String> {
    let mut done = Vec::with_capacity(held.len());
    for h in held {
        let r = with(&h.disk, |d| {
            let name = d.name().to_string();
            d.freeze().map(|frozen| (name, frozen))
        });
        match r {
            Ok((name, frozen)) => done.push(FrozenDisk {
                index: h.index,
                id: h.id.clone(),
                datastore: h.path.clone(),
                name,
                frozen,
            }),
            Err(e) => {
                unfreeze_all(held, &done);
                return Err(format!("freezing disk '{}': {e}", h.id));
            }
        }
    }
    test_hold_after_freeze();
    Ok(done)
}

/// Undoes [`freeze_all`] for the disks in `frozen` (a snapshot that failed after freezing): the
/// VM goes on in the original files, as if no snapshot had been asked for. A disk that cannot
/// be unfrozen stays on its redo log (consistent, one level deeper), which is said.
pub(crate) fn unfreeze_all(held: &[Held], frozen: &[FrozenDisk]) {
    for f in frozen {
        if let Some(h) = held.iter().find(|h| h.index == f.index) {
            if let Err(e) = with(&h.disk, wv_vmkfs::Disk::unfreeze) {
                eprintln!(
                    "wv: snapshot failed; disk '{}' stays on a redo log over {} ({e})",
                    f.id, f.frozen
                );
            }
        }
    }
}

/// A disk a migration's source has handed over (docs/MIGRATION.md): where to take it back from
/// if the target never gets `go`.
pub(crate) struct HandedOver {
    index: usize,
    id: String,
    path: PathBuf,
    name: String,
}

/// A migration's source, paused and acknowledged by the target: hands every disk of `held`
/// over to the target (pid `pid` on `host`) with `token` ([`wv_vmkfs::Disk::hand_over`]:
/// flushed, the owner record naming the target, the lock released). If one fails, those already
/// handed over are taken back and the error says which disk failed.
pub(crate) fn hand_over_all(
    held: &[Held],
    host: &str,
    pid: u32,
    token: u64,
) -> Result<Vec<HandedOver>, String> {
    let mut done = Vec::with_capacity(held.len());
    for h in held {
        let mut g = h.disk.lock().unwrap_or_else(|p| p.into_inner());
        let r = match g.as_mut() {
            Some(d) => {
                let name = d.name().to_string();
                d.hand_over(host, pid, token)
                    .map(|()| name)
                    .map_err(|e| e.to_string())
            }
            None => Err("the VMKFS disk was closed".to_string()),
        };
        if r.is_ok() {
            // Handed over: the handle holds nothing any more.
            drop(g.take());
        }
        drop(g);
        match r {
            Ok(name) => done.push(HandedOver {
                index: h.index,
                id: h.id.clone(),
                path: h.path.clone(),
                name,
            }),
            Err(e) => {
                take_back_all(held, &done, token);
                return Err(format!("handing disk '{}' over: {e}", h.id));
            }
        }
    }
    Ok(done)
}

/// Undoes [`hand_over_all`] (the target did not get `go`): each disk is taken back with the
/// token, as the target would have taken it. Returns false if one could not be (the target
/// has it: the VM must not run here).
pub(crate) fn take_back_all(held: &[Held], handed: &[HandedOver], token: u64) -> bool {
    let mut all = true;
    for d in handed {
        let Some(h) = held.iter().find(|h| h.index == d.index) else {
            continue;
        };
        let r = open_pending(&d.path, &d.name)
            .and_then(|p| p.take(token, TAKE_WAIT).map_err(|e| e.to_string()));
        match r {
            Ok(disk) => *h.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(disk),
            Err(e) => {
                eprintln!(
                    "wv: migration: disk '{}' could not be taken back from the target: {e}",
                    d.id
                );
                all = false;
            }
        }
    }
    all
}

/// How long a taker waits for a file's lock (someone merely looking at the file may hold it
/// for a moment).
pub(crate) const TAKE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_pending(path: &Path, name: &str) -> Result<wv_vmkfs::Pending, String> {
    let dev = FileDev::open(path, false).map_err(|e| e.to_string())?;
    let ds = Datastore::open(Arc::new(dev)).map_err(|e| e.to_string())?;
    ds.prepare_take_over(name).map_err(|e| e.to_string())
}

/// A disk a migration's target will take over after `go` ([`VmkfsDisk::incoming`]).
pub(crate) struct Taker {
    id: String,
    /// DATASTORE:NAME, for messages.
    at: String,
    pending: wv_vmkfs::Pending,
    disk: Arc<Mutex<Option<wv_vmkfs::Disk>>>,
}

impl Taker {
    /// `'ID' (DATASTORE:NAME)`.
    pub(crate) fn describe(&self) -> String {
        format!("'{}' ({})", self.id, self.at)
    }

    /// Takes the disk over with `token` (the source has handed it over); the device then
    /// reads and writes it.
    pub(crate) fn take(self, token: u64) -> Result<(), String> {
        let d = self
            .pending
            .take(token, TAKE_WAIT)
            .map_err(|e| format!("taking disk '{}' over: {e}", self.id))?;
        *self.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
        Ok(())
    }
}

impl VmkfsDisk {
    /// For a migration's target: disk `name` of the datastore at `path`, checked (it exists,
    /// is writable and has `size` bytes) and its parents held, but closed until its [`Taker`]
    /// takes it over after `go`. Nothing in the datastore changes until then.
    pub(crate) fn incoming(
        path: &Path,
        name: &str,
        id: &str,
        size: u64,
    ) -> Result<(VmkfsDisk, Taker), String> {
        let pending = open_pending(path, name)
            .map_err(|e| format!("disk '{id}' ({}:{name}): {e}", path.display()))?;
        if pending.len() != size {
            return Err(format!(
                "disk '{id}' ({}:{name}) has {} bytes here, {size} on the source",
                path.display(),
                pending.len()
            ));
        }
        let disk = Arc::new(Mutex::new(None));
        let d = disk.clone();
        crate::at_exit(Box::new(move || {
            drop(d.lock().unwrap_or_else(|p| p.into_inner()).take());
        }));
        Ok((
            VmkfsDisk {
                disk: disk.clone(),
                size,
                writable: true,
                bounce: Vec::new(),
            },
            Taker {
                id: id.to_string(),
                at: format!("{}:{name}", path.display()),
                pending,
                disk,
            },
        ))
    }
}

/// In debug builds (the tests'), WV_TEST_SNAPSHOT_HOLD_FD names an inherited descriptor: once
/// the disks are frozen, the VMM says so on stderr and reads it until end-of-file before it
/// writes the snapshot, so a test can kill it between the two. Nothing in release builds.
fn test_hold_after_freeze() {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(fd) = std::env::var("WV_TEST_SNAPSHOT_HOLD_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
    else {
        return;
    };
    eprintln!("wv-test: disks frozen");
    let mut b = [0u8; 1];
    // SAFETY: reading into a local buffer from a descriptor the test gave this process.
    while unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) } > 0 {}
}

/// The configuration a snapshot records: each frozen disk named by its frozen file.
pub(crate) fn snapshot_config(cfg: &crate::VmConfig, frozen: &[FrozenDisk]) -> crate::VmConfig {
    let mut c = cfg.clone();
    for f in frozen {
        if let Some(d) = c.disks.get_mut(f.index) {
            d.vmkfs = Some(f.frozen.clone());
        }
    }
    c
}

/// For a restore: a new branch of each frozen disk of the snapshot, opened for writing; the
/// configuration the restored VM runs with names the branches. Checks that every frozen disk
/// matches a VMKFS disk of the snapshot's configuration.
pub(crate) fn branch_disks(
    cfg: &crate::VmConfig,
    frozen: &[FrozenDisk],
) -> Result<(crate::VmConfig, Vec<(usize, VmkfsDisk)>), VmmError> {
    let mut c = cfg.clone();
    let mut opened = Vec::with_capacity(frozen.len());
    for f in frozen {
        let d = c
            .disks
            .get_mut(f.index)
            .filter(|d| d.id == f.id && d.path == f.datastore && !d.readonly)
            .filter(|d| d.vmkfs.as_deref() == Some(f.frozen.as_str()))
            .ok_or_else(|| {
                VmmError::Snapshot(format!(
                    "the snapshot's disk '{}' ({}:{}) does not match its configuration",
                    f.id,
                    f.datastore.display(),
                    f.frozen
                ))
            })?;
        let disk = VmkfsDisk::open_branch(&f.datastore, &f.frozen)?;
        d.vmkfs = Some(disk.name());
        opened.push((f.index, disk));
    }
    Ok((c, opened))
}

impl wv_virtio::block::Disk for VmkfsDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn readonly(&self) -> bool {
        !self.writable
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|d| d.read_at(buf, offset))
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|d| d.write_at(buf, offset))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.with(|d| d.flush())
    }
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> io::Result<()> {
        let disk = &self.disk;
        bounce_read(mem, segs, offset, self.size, &mut self.bounce, |buf, o| {
            with(disk, |d| d.read_at(buf, o))
        })
    }
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> io::Result<()> {
        let disk = &self.disk;
        bounce_write(mem, segs, offset, self.size, &mut self.bounce, |buf, o| {
            with(disk, |d| d.write_at(buf, o))
        })
    }
    /// Blocks stay allocated (VMKFS disks are preallocated by design); the range reads as
    /// zeros afterwards, as the guest expects.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, mut offset: u64, mut len: u64) -> io::Result<()> {
        let zeros = vec![0u8; 1 << 20];
        while len > 0 {
            let n = len.min(zeros.len() as u64);
            // n is at most 1 MiB.
            #[allow(clippy::cast_possible_truncation)]
            self.write_at(&zeros[..n as usize], offset)?;
            offset += n;
            len -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use wv_virtio::block::{Disk, CHUNK};
    use wv_vmkfs::MkfsOptions;

    #[test]
    fn requests_move_in_bounded_chunks_and_stay_inside_the_disk() {
        let p = std::env::temp_dir().join(format!("wv-vmkfs-disk-{}", std::process::id()));
        std::fs::File::create(&p)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let dev = Arc::new(FileDev::open(&p, false).unwrap());
        let opts = MkfsOptions {
            block_size: 1 << 20,
            max_files: 4,
            label: "t".into(),
        };
        let mut ds = Datastore::mkfs(dev, &opts).unwrap();
        ds.create("d", 4 << 20, false).unwrap();
        drop(ds);
        let mut d = VmkfsDisk::open(&p, "d", false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let pattern: Vec<u8> = (0..(3 << 20) + 512).map(|i: u32| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
        // Two pieces, one larger than a chunk, written and read back elsewhere.
        let w = [(0x1000, 512), (0x1200, 3 << 20)];
        d.write_from(&mem, &w, 512).unwrap();
        assert!(
            d.bounce.len() <= CHUNK,
            "bounce buffer of {}",
            d.bounce.len()
        );
        let r = [(0x40_0000, (3 << 20) + 512)];
        d.read_into(&mem, &r, 512).unwrap();
        let mut back = vec![0u8; pattern.len()];
        mem.read_slice(&mut back, GuestAddress(0x40_0000)).unwrap();
        assert!(back == pattern, "data read back differs");
        assert_eq!(d.bounce.len(), CHUNK);
        // A request reaching past the disk (4 MiB) is refused before any buffer is sized.
        let mut fresh = VmkfsDisk {
            bounce: Vec::new(),
            ..d
        };
        let past = [(0x1000, 512), (0x10_0000, usize::MAX / 2)];
        assert!(fresh.read_into(&mem, &past, 0).is_err());
        assert!(fresh
            .write_from(&mem, &[(0x1000, 1024)], (4 << 20) - 512)
            .is_err());
        assert!(
            fresh.bounce.capacity() == 0,
            "no buffer for a refused request"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
