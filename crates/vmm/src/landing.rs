//! Where a migration's copied disks land on the target (`--copy-disks`, docs/MIGRATION.md):
//! [`Landing`] creates each disk the stream declares (a raw image in the directory given, a
//! VMKFS disk in the datastore given; never over an existing file), writes its blocks as they
//! arrive, and, once the stream is whole, hands the VM's configuration its new paths and the
//! devices the disks, still open and locked (exclusive from creation to the VM's end). Until the source says `go`, a failed migration removes every disk
//! it created ([`Landed`]): the target keeps nothing.

use crate::migrate::{CopiedDisk, DiskSink};
use crate::vmkfs_disk::VmkfsDisk;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wv_virtio::block::Disk as _;
use wv_virtio::block::DIRTY_BLOCK;
use wv_vmkfs::{Datastore, FileDev};

/// Where copied disks go on a migration's target (`wv run --incoming ... --disk-dir DIR
/// --datastore PATH`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskPlaces {
    /// Directory for raw images (created there under their file names).
    pub dir: Option<PathBuf>,
    /// Datastore for VMKFS disks (created there under their names).
    pub datastore: Option<PathBuf>,
}

enum Place {
    Raw { path: PathBuf, file: File },
    Vmkfs { datastore: PathBuf, disk: VmkfsDisk },
}

struct Disk {
    info: CopiedDisk,
    place: Place,
    /// Blocks (of [`DIRTY_BLOCK`] bytes) written so far: a zero record over blocks never written
    /// changes nothing (the disk starts zero).
    touched: Vec<u64>,
}

/// The disks a stream copies, as they arrive. Dropped before [`Landing::finish`], it removes
/// them.
pub(crate) struct Landing<'a> {
    places: &'a DiskPlaces,
    disks: Vec<Disk>,
}

impl<'a> Landing<'a> {
    pub(crate) fn new(places: &'a DiskPlaces) -> Landing<'a> {
        Landing {
            places,
            disks: Vec::new(),
        }
    }

    fn get(&mut self, index: usize) -> Result<&mut Disk, String> {
        self.disks
            .iter_mut()
            .find(|d| d.info.index == index)
            .ok_or_else(|| format!("disk {index} was not created"))
    }
}

fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / DIRTY_BLOCK..(offset + len).div_ceil(DIRTY_BLOCK)
}

fn bit(bits: &[u64], b: u64) -> bool {
    usize::try_from(b / 64)
        .ok()
        .and_then(|w| bits.get(w))
        .is_some_and(|x| x & (1 << (b % 64)) != 0)
}

fn flock_ex(f: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl DiskSink for Landing<'_> {
    fn create(&mut self, d: &CopiedDisk) -> Result<(), String> {
        let words = usize::try_from(d.size.div_ceil(DIRTY_BLOCK).div_ceil(64))
            .map_err(|_| format!("{} bytes is too large a disk", d.size))?;
        let mut touched = Vec::new();
        touched
            .try_reserve_exact(words)
            .map_err(|e| format!("{} bytes: {e}", d.size))?;
        touched.resize(words, 0);
        let place = if d.vmkfs {
            let ds = self.places.datastore.as_ref().ok_or_else(|| {
                "a VMKFS disk copied by the migration needs a datastore on the target \
                 (--datastore)"
                    .to_string()
            })?;
            Place::Vmkfs {
                datastore: ds.clone(),
                disk: create_vmkfs(ds, &d.name, d.size)?,
            }
        } else {
            let dir = self.places.dir.as_ref().ok_or_else(|| {
                "a raw image copied by the migration needs a directory on the target \
                 (--disk-dir)"
                    .to_string()
            })?;
            if wv_config::copied_file_name(Path::new(&d.name)) != Some(d.name.as_str()) {
                return Err(format!("'{}' is not a file name", d.name));
            }
            let path = dir.join(&d.name);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| {
                    format!(
                        "cannot create {} (an existing file is never overwritten): {e}",
                        path.display()
                    )
                })?;
            if let Err(e) = flock_ex(&file).and_then(|()| file.set_len(d.size)) {
                let _ = std::fs::remove_file(&path);
                return Err(format!("{}: {e}", path.display()));
            }
            Place::Raw { path, file }
        };
        self.disks.push(Disk {
            info: d.clone(),
            place,
            touched,
        });
        Ok(())
    }

    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        let d = self.get(index)?;
        for b in blocks(offset, data.len() as u64) {
            if let Some(w) = usize::try_from(b / 64)
                .ok()
                .and_then(|w| d.touched.get_mut(w))
            {
                *w |= 1 << (b % 64);
            }
        }
        match &mut d.place {
            Place::Raw { file, .. } => file.write_all_at(data, offset),
            Place::Vmkfs { disk, .. } => disk.write_at(data, offset),
        }
        .map_err(|e| e.to_string())
    }

    fn zero(&mut self, index: usize, offset: u64, len: u64) -> Result<(), String> {
        let d = self.get(index)?;
        if !blocks(offset, len).any(|b| bit(&d.touched, b)) {
            return Ok(());
        }
        match &mut d.place {
            Place::Raw { file, .. } => zero_raw(file, offset, len),
            Place::Vmkfs { disk, .. } => disk.write_zeroes(offset, len),
        }
        .map_err(|e| e.to_string())
    }
}

fn zero_raw(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate on our descriptor with checked arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64);
        // n <= 1 MiB.
        #[allow(clippy::cast_possible_truncation)]
        file.write_all_at(&zeros[..n as usize], offset + at)?;
        at += n;
    }
    Ok(())
}

/// Creates VMKFS disk `name` of `size` bytes (thin: it reads as zeros) in the datastore at
/// `ds` and opens it for writing; a disk of that name there already is refused.
fn create_vmkfs(ds: &Path, name: &str, size: u64) -> Result<VmkfsDisk, String> {
    let bad = |e: String| format!("{}:{name}: {e}", ds.display());
    let dev = FileDev::open(ds, false).map_err(|e| bad(e.to_string()))?;
    let mut store = Datastore::open(Arc::new(dev)).map_err(|e| bad(e.to_string()))?;
    store
        .create(name, size, true)
        .map_err(|e| bad(e.to_string()))?;
    match store.open_disk(name, true) {
        Ok(d) => Ok(VmkfsDisk::hold(d)),
        Err(e) => {
            let _ = store.remove(name);
            Err(bad(e.to_string()))
        }
    }
}

fn remove_vmkfs(ds: &Path, name: &str) -> Result<(), String> {
    let dev = FileDev::open(ds, false).map_err(|e| e.to_string())?;
    let mut store = Datastore::open(Arc::new(dev)).map_err(|e| e.to_string())?;
    store.remove(name).map_err(|e| e.to_string())
}

/// The disks a migration created on the target, removed unless [`Landed::keep`] is called
/// (the source said `go`).
#[derive(Default)]
pub(crate) struct Landed {
    raw: Vec<PathBuf>,
    vmkfs: Vec<(PathBuf, String, crate::vmkfs_disk::Closer)>,
}

impl Landed {
    /// The VM is the target's: its disks stay.
    pub(crate) fn keep(mut self) {
        self.raw.clear();
        self.vmkfs.clear();
    }
}

impl Drop for Landed {
    fn drop(&mut self) {
        for p in self.raw.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                eprintln!(
                    "wv: incoming migration: cannot remove the copied disk {}: {e}",
                    p.display()
                );
            }
        }
        for (ds, name, close) in self.vmkfs.drain(..) {
            close.close();
            if let Err(e) = remove_vmkfs(&ds, &name) {
                eprintln!(
                    "wv: incoming migration: cannot remove the copied disk {}:{name}: {e}",
                    ds.display()
                );
            }
        }
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        drop(self.take_landed());
    }
}

/// What [`Landing::finish`] hands on.
pub(crate) struct Finished {
    /// The VM's configuration, the copied disks at their new paths.
    pub(crate) cfg: crate::VmConfig,
    /// The VMKFS disks, open for writing, by index: the devices take them.
    pub(crate) opened: Vec<(usize, VmkfsDisk)>,
    /// The raw images, open and locked, by index: the devices take them.
    pub(crate) raw: Vec<(usize, File)>,
    /// What to remove if the migration fails before `go`.
    pub(crate) landed: Landed,
}

impl Landing<'_> {
    /// What to remove if the migration fails from here on (the disks leave `self`).
    fn take_landed(&mut self) -> Landed {
        let mut l = Landed::default();
        for d in self.disks.drain(..) {
            match d.place {
                Place::Raw { path, file } => {
                    drop(file);
                    l.raw.push(path);
                }
                Place::Vmkfs { datastore, disk } => {
                    l.vmkfs
                        .push((datastore, d.info.name.clone(), disk.closer()));
                }
            }
        }
        l
    }

    /// The stream is whole: checks that the copied disks are exactly the writable disks of
    /// `cfg` (index, id, kind, name), makes them durable, and returns the configuration with
    /// their new paths, the disks for the devices (by index, still open and locked: nobody
    /// can open them between the copy and the VM), and what to remove if the migration still
    /// fails.
    pub(crate) fn finish(mut self, cfg: &crate::VmConfig) -> Result<Finished, String> {
        for d in &self.disks {
            let ok = cfg.disks.get(d.info.index).is_some_and(|c| {
                !c.readonly
                    && c.id == d.info.id
                    && c.vmkfs.is_some() == d.info.vmkfs
                    && match &c.vmkfs {
                        Some(n) => *n == d.info.name,
                        None => wv_config::copied_file_name(&c.path) == Some(d.info.name.as_str()),
                    }
            });
            if !ok {
                return Err(format!(
                    "the stream copies disk {} ('{}', {}) that is not a writable disk of the \
                     VM's configuration",
                    d.info.index, d.info.id, d.info.name
                ));
            }
        }
        if let Some((i, c)) = cfg
            .disks
            .iter()
            .enumerate()
            .find(|(i, c)| !c.readonly && !self.disks.iter().any(|d| d.info.index == *i))
        {
            return Err(format!(
                "the stream copies some disks but not the writable disk {i} ('{}')",
                c.id
            ));
        }
        let new = wv_config::copied_disk_places(
            cfg,
            self.places.dir.as_deref(),
            self.places.datastore.as_deref(),
        )
        .map_err(|e| e.0)?;
        for d in &mut self.disks {
            match &mut d.place {
                Place::Raw { file, path } => file
                    .sync_data()
                    .map_err(|e| format!("{}: {e}", path.display()))?,
                Place::Vmkfs { disk, .. } => disk
                    .flush()
                    .map_err(|e| format!("disk '{}': {e}", d.info.id))?,
            }
        }
        let mut opened = Vec::new();
        let mut raw = Vec::new();
        let mut landed = Landed::default();
        for d in self.disks.drain(..) {
            match d.place {
                Place::Raw { path, file } => {
                    raw.push((d.info.index, file));
                    landed.raw.push(path);
                }
                Place::Vmkfs { datastore, disk } => {
                    landed
                        .vmkfs
                        .push((datastore, d.info.name.clone(), disk.closer()));
                    opened.push((d.info.index, disk));
                }
            }
        }
        Ok(Finished {
            cfg: new,
            opened,
            raw,
            landed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wv_vmkfs::MkfsOptions;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("wv-landing-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn datastore(dir: &Path) -> PathBuf {
        let p = dir.join("ds.img");
        File::create(&p).unwrap().set_len(16 << 20).unwrap();
        let dev = Arc::new(FileDev::open(&p, false).unwrap());
        let opts = MkfsOptions {
            block_size: 1 << 20,
            max_files: 4,
            label: "t".into(),
        };
        Datastore::mkfs(dev, &opts).unwrap();
        p
    }

    fn files(ds: &Path) -> Vec<String> {
        let dev = Arc::new(FileDev::open(ds, false).unwrap());
        let mut s = Datastore::open(dev).unwrap();
        s.list().unwrap().into_iter().map(|f| f.name).collect()
    }

    fn copied(index: usize, vmkfs: bool, name: &str) -> CopiedDisk {
        CopiedDisk {
            index,
            id: format!("d{index}"),
            vmkfs,
            name: name.into(),
            size: 2 << 20,
        }
    }

    #[test]
    fn copied_disks_are_created_written_and_removed_unless_kept() {
        let dir = tmp("a");
        let ds = datastore(&dir);
        let places = DiskPlaces {
            dir: Some(dir.join("disks")),
            datastore: Some(ds.clone()),
        };
        std::fs::create_dir(dir.join("disks")).unwrap();
        // Dropped half-way: nothing is left.
        let mut l = Landing::new(&places);
        l.create(&copied(0, false, "root.img")).unwrap();
        l.create(&copied(1, true, "data")).unwrap();
        l.write(0, 512, &[7; 512]).unwrap();
        assert!(dir.join("disks/root.img").exists());
        assert_eq!(files(&ds), vec!["data".to_string()]);
        drop(l);
        assert!(!dir.join("disks/root.img").exists());
        assert!(files(&ds).is_empty(), "the VMKFS disk is removed");

        // Names that are not file names, an existing file, no place: refused.
        let mut l = Landing::new(&places);
        assert!(l.create(&copied(0, false, "../x")).is_err());
        std::fs::write(dir.join("disks/there.img"), b"x").unwrap();
        assert!(l
            .create(&copied(0, false, "there.img"))
            .unwrap_err()
            .contains("never overwritten"));
        let none = DiskPlaces::default();
        let mut n = Landing::new(&none);
        assert!(n
            .create(&copied(0, false, "a.img"))
            .unwrap_err()
            .contains("--disk-dir"));
        assert!(n
            .create(&copied(0, true, "a"))
            .unwrap_err()
            .contains("--datastore"));
        drop(l);

        // Whole: the configuration names the copies; kept, they stay.
        let cfg = crate::VmConfig {
            disks: vec![
                crate::DiskConfig::parse("path=/src/root.img,id=d0", 0).unwrap(),
                crate::DiskConfig::parse("vmkfs=/src/ds:data,id=d1", 1).unwrap(),
            ],
            ..crate::VmConfig::default()
        };
        let mut l = Landing::new(&places);
        l.create(&copied(0, false, "root.img")).unwrap();
        l.create(&copied(1, true, "data")).unwrap();
        l.write(0, 1 << 20, &[9; 4096]).unwrap();
        l.write(1, 0, &[3; 512]).unwrap();
        l.zero(0, 1 << 20, 512).unwrap();
        let f = l.finish(&cfg).unwrap();
        assert_eq!(f.cfg.disks[0].path, dir.join("disks/root.img"));
        assert_eq!(f.cfg.disks[1].path, ds);
        assert_eq!(f.opened.len(), 1);
        let img = std::fs::read(dir.join("disks/root.img")).unwrap();
        assert_eq!(img.len(), 2 << 20);
        assert_eq!((img[1 << 20], img[(1 << 20) + 512]), (0, 9));
        f.landed.keep();
        assert!(dir.join("disks/root.img").exists());
        drop(f.opened);
        assert_eq!(files(&ds), vec!["data".to_string()]);

        // A copied disk the configuration does not have: refused, and removed.
        let mut l = Landing::new(&places);
        l.create(&copied(0, false, "other.img")).unwrap();
        let e = l.finish(&cfg).err().unwrap();
        assert!(e.contains("not a writable disk"), "{e}");
        assert!(!dir.join("disks/other.img").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
