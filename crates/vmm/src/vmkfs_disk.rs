//! A virtio-blk backend on a VMKFS virtual disk (`--disk vmkfs=DATASTORE:NAME`): the disk is
//! opened exclusively for writing (or shared, read-only) through the datastore's locks, and
//! closed by an exit hook (the VMM ends without dropping its devices), which clears its owner
//! record: only a VMM that dies leaves a stale lock. Data moves between guest memory and the
//! disk through one bounce buffer of at most 1 MiB ([`wv_virtio::block::CHUNK`]), kept for
//! the life of the disk, after checking that the request lies inside the disk.

use crate::error::VmmError;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use wv_machine::GuestRam as GuestMemoryMmap;
use wv_virtio::block::{bounce_read, bounce_write};
use wv_vmkfs::{Datastore, FileDev};

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
            bounce: Vec::new(),
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
