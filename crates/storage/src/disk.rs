//! The disks the service serves: what `--disk` names (a raw image or a VMKFS disk) and how it
//! is opened and held: a raw image under `flock` (exclusive for writing, shared read-only), a
//! VMKFS disk through the datastore's locks and owner record. Either is held for as long as the
//! service serves it and released when it is dropped (or by the kernel if the service dies;
//! a VMKFS owner record then stays behind, see [`open`]).

use std::path::PathBuf;
use std::sync::Arc;
use wv_virtio::block::{bounce_read, bounce_write, Disk, RawDisk, CHUNK};
use wv_virtio::GuestMemoryMmap;

/// Where a disk's data is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A raw image file or block device.
    Raw(PathBuf),
    /// Disk `disk` of the VMKFS datastore at `datastore`.
    Vmkfs {
        /// The datastore (a file or block device).
        datastore: PathBuf,
        /// The disk's name in it.
        disk: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Raw(p) => write!(f, "path={}", p.display()),
            Source::Vmkfs { datastore, disk } => {
                write!(f, "vmkfs={}:{disk}", datastore.display())
            }
        }
    }
}

/// One disk to serve: `NAME=path=IMG|vmkfs=DS:DISK[,readonly=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Its name: the socket is `DIR/NAME.sock`, and the guest reads it with GET_ID.
    pub name: String,
    /// Its data.
    pub source: Source,
    /// Served read-only (opened shared; writes refused).
    pub readonly: bool,
}

impl DiskSpec {
    /// Parses `NAME=path=IMG|vmkfs=DS:DISK[,readonly=on|off]`.
    pub fn parse(spec: &str) -> Result<DiskSpec, String> {
        let usage = || {
            format!(
                "--disk '{}': expected NAME=path=IMG or NAME=vmkfs=DATASTORE:DISK, then \
                 [,readonly=on|off] (NAME: 1-64 of A-Z a-z 0-9 _ . -, not starting with .)",
                spec.escape_debug()
            )
        };
        let (name, rest) = spec.split_once('=').ok_or_else(usage)?;
        if !wv_virtio::vu_backend::valid_name(name) {
            return Err(usage());
        }
        let (mut source, mut readonly) = (None, false);
        for part in rest.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() && source.is_none() => {
                    source = Some(Source::Raw(PathBuf::from(p)));
                }
                Some(("vmkfs", v)) if source.is_none() => match v.rsplit_once(':') {
                    Some((ds, d)) if !ds.is_empty() && !d.is_empty() => {
                        source = Some(Source::Vmkfs {
                            datastore: PathBuf::from(ds),
                            disk: d.to_string(),
                        });
                    }
                    _ => return Err(usage()),
                },
                Some(("readonly", "on")) => readonly = true,
                Some(("readonly", "off")) => readonly = false,
                _ => return Err(usage()),
            }
        }
        Ok(DiskSpec {
            name: name.to_string(),
            source: source.ok_or_else(usage)?,
            readonly,
        })
    }
}

/// Opens the disk of `spec` and takes its lock. A VMKFS disk whose owner record names a
/// writer that is gone (a storage service killed with it open) is refused as stale, unless
/// `take_stale`: then the record is broken as `wv fs unlock` does (which refuses while anyone
/// holds the disk's lock) and the disk opened.
pub fn open(spec: &DiskSpec, take_stale: bool) -> Result<Box<dyn Disk>, String> {
    match &spec.source {
        Source::Raw(p) => Ok(Box::new(
            RawDisk::open(p, spec.readonly).map_err(|e| e.to_string())?,
        )),
        Source::Vmkfs { datastore, disk } => {
            let bad = |e: String| {
                format!(
                    "disk {} (vmkfs={}:{disk}): {e}",
                    spec.name,
                    datastore.display()
                )
            };
            let dev = wv_vmkfs::FileDev::open(datastore, spec.readonly)
                .map_err(|e| bad(e.to_string()))?;
            let mut ds =
                wv_vmkfs::Datastore::open(Arc::new(dev)).map_err(|e| bad(e.to_string()))?;
            let d = match ds.open_disk(disk, !spec.readonly) {
                Err(wv_vmkfs::Error::StaleLock(m)) if take_stale => {
                    eprintln!("wv storage: disk {}: breaking a stale lock: {m}", spec.name);
                    ds.unlock(disk).map_err(|e| bad(e.to_string()))?;
                    ds.open_disk(disk, !spec.readonly)
                }
                r => r,
            }
            .map_err(|e| bad(e.to_string()))?;
            Ok(Box::new(VmkfsBacked {
                size: d.len(),
                writable: d.writable(),
                disk: d,
                bounce: Vec::new(),
            }))
        }
    }
}

/// A VMKFS disk as a block backend: data through one bounce buffer of at most [`CHUNK`]
/// bytes kept for the life of the disk, after checking that a request lies inside it.
/// Dropping it clears its owner record and releases its locks.
struct VmkfsBacked {
    disk: wv_vmkfs::Disk,
    size: u64,
    writable: bool,
    bounce: Vec<u8>,
}

fn vmkfs_err(e: wv_vmkfs::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Disk for VmkfsBacked {
    fn size(&self) -> u64 {
        self.size
    }
    fn readonly(&self) -> bool {
        !self.writable
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.disk.read_at(buf, offset).map_err(vmkfs_err)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.disk.write_at(buf, offset).map_err(vmkfs_err)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.disk.flush().map_err(vmkfs_err)
    }
    /// Blocks stay allocated (VMKFS disks are preallocated by design); the range reads as
    /// zeros afterwards.
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
        while len > 0 {
            let n = zeros.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            self.write_at(&zeros[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        let VmkfsBacked {
            disk, size, bounce, ..
        } = self;
        bounce_read(mem, segs, offset, *size, bounce, |b, o| {
            disk.read_at(b, o).map_err(vmkfs_err)
        })
    }
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        let VmkfsBacked {
            disk, size, bounce, ..
        } = self;
        bounce_write(mem, segs, offset, *size, bounce, |b, o| {
            disk.write_at(b, o).map_err(vmkfs_err)
        })
    }
}
