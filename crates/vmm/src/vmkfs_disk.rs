//! A virtio-blk backend on a VMKFS virtual disk (`--disk vmkfs=DATASTORE:NAME`): the disk is
//! opened exclusively for writing (or shared, read-only) through the datastore's locks, and
//! closed by an exit hook (the VMM ends without dropping its devices), which clears its owner
//! record: only a VMM that dies leaves a stale lock.

use crate::error::VmmError;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use wv_vmkfs::{Datastore, FileDev};

/// An open VMKFS disk.
pub struct VmkfsDisk {
    disk: Arc<Mutex<Option<wv_vmkfs::Disk>>>,
    size: u64,
    writable: bool,
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
        let (size, writable) = (disk.len(), disk.writable());
        let disk = Arc::new(Mutex::new(Some(disk)));
        let d = disk.clone();
        crate::at_exit(Box::new(move || {
            drop(d.lock().unwrap_or_else(|p| p.into_inner()).take());
        }));
        Ok(VmkfsDisk {
            disk,
            size,
            writable,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut wv_vmkfs::Disk) -> wv_vmkfs::Result<T>) -> io::Result<T> {
        let mut g = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(d) => f(d).map_err(other),
            None => Err(io::Error::other("the VMKFS disk was closed")),
        }
    }
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
