//! VMKFS, the datastore file system for virtual disks (seed 000 [0094-0099]): few, large files
//! in very large blocks (1 MiB by default), so all metadata of a datastore is cached in memory
//! and a preallocated disk's reads and writes touch no metadata; copy-on-write redo logs for
//! snapshots; metadata changes journaled and checksummed; exclusive opens recorded in the
//! datastore and enforced with host locks.
//!
//! - [`format`]: the on-disk pages (docs/VMKFS.md);
//! - [`dev`]: the block layer (files, block devices, memory, a write recorder for crash tests);
//! - [`fs`]: the datastore: metadata cache, journal, allocation, files, redo logs, check;
//! - [`disk`]: an open virtual disk, the data path.

// Casts: usize is 64 bits (checked below); the u32 casts are of counts the geometry bounds
// (block numbers below 2^32, at most 16384 files, indexes within a 4 KiB page); the c_short
// casts are of small fcntl constants.
#![allow(clippy::cast_possible_truncation)]
#[cfg(not(target_pointer_width = "64"))]
compile_error!("VMKFS assumes 64-bit usize");

pub mod crc;
pub mod dev;
pub mod disk;
pub mod format;
pub mod fs;

pub use dev::{Dev, FileDev, MemDev};
pub use disk::{Disk, Pending};
pub use fs::{set_owner_pid, Datastore, FileInfo, Info, MkfsOptions, ProgressFn, Report};

/// What went wrong, with a message that names the thing concerned.
#[derive(Debug)]
pub enum Error {
    /// The device failed.
    Io(String),
    /// The metadata is damaged (`check --repair` may fix it).
    Corrupt(String),
    /// A format or feature this version does not support.
    Unsupported(String),
    /// A bad argument (name, size, option).
    Invalid(String),
    /// No such file.
    NotFound(String),
    /// A file of that name exists.
    Exists(String),
    /// Not enough free blocks, pointer blocks or file slots.
    NoSpace(String),
    /// Someone else has the file open.
    InUse(String),
    /// A crashed owner's lock record is still in the datastore.
    StaleLock(String),
    /// The file cannot be written (a frozen parent, a read-only open).
    ReadOnly(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(m) => write!(f, "I/O error: {m}"),
            Error::Corrupt(m) => write!(f, "corrupt datastore: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::Invalid(m)
            | Error::NotFound(m)
            | Error::Exists(m)
            | Error::InUse(m)
            | Error::StaleLock(m)
            | Error::ReadOnly(m) => f.write_str(m),
            Error::NoSpace(m) => write!(f, "no space left: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Wraps an I/O error with what was being done.
pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(format!("{what}: {e}"))
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
