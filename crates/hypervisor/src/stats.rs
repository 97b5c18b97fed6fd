//! KVM's own per-vCPU counters (the binary statistics of `KVM_GET_STATS_FD`): they cover the
//! exits KVM handles in the kernel (HLT with the in-kernel irqchip, LAPIC and PIT accesses,
//! instruction emulation), which never reach the VMM's run loop.
#![allow(clippy::cast_possible_truncation)] // header fields are u32 offsets; x86-64 only

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const KVM_GET_STATS_FD: libc::c_ulong = 0xaece; // _IO(KVMIO, 0xce)
const KVM_STATS_TYPE_MASK: u32 = 0xf;
const KVM_STATS_TYPE_CUMULATIVE: u32 = 0;
const HEADER: usize = 24;
const DESC: usize = 16;

fn pread_all(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reading into the unfilled part of a live buffer from a descriptor we own.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                i64::try_from(offset + done as u64).map_err(|_| io::ErrorKind::InvalidInput)?,
            )
        };
        if n <= 0 {
            return Err(if n == 0 {
                io::ErrorKind::UnexpectedEof.into()
            } else {
                io::Error::last_os_error()
            });
        }
        done += n as usize;
    }
    Ok(())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Parses a binary-stats file image: header, descriptors and data, as KVM lays them out.
/// Returns the cumulative single-value counters by name.
pub fn parse(
    read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<Vec<(String, u64)>> {
    let mut h = [0u8; HEADER];
    read(&mut h, 0)?;
    let (name_size, num_desc) = (u32_at(&h, 4) as usize, u32_at(&h, 8) as usize);
    let (desc_off, data_off) = (u64::from(u32_at(&h, 16)), u64::from(u32_at(&h, 20)));
    if name_size > 256 || num_desc > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible KVM stats header",
        ));
    }
    let stride = DESC + name_size;
    let mut descs = vec![0u8; stride * num_desc];
    read(&mut descs, desc_off)?;
    let mut out = Vec::new();
    for d in descs.chunks_exact(stride) {
        let flags = u32_at(d, 0);
        let size = u16::from_le_bytes([d[6], d[7]]);
        let offset = u64::from(u32_at(d, 8));
        if flags & KVM_STATS_TYPE_MASK != KVM_STATS_TYPE_CUMULATIVE || size != 1 {
            continue;
        }
        let name = &d[DESC..];
        let name = String::from_utf8_lossy(
            &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())],
        )
        .into_owned();
        let mut v = [0u8; 8];
        read(&mut v, data_off + offset)?;
        out.push((name, u64::from_le_bytes(v)));
    }
    Ok(out)
}

/// KVM's cumulative counters for one vCPU.
pub fn vcpu_counters(vcpu: &impl AsRawFd) -> io::Result<Vec<(String, u64)>> {
    read_counters(&stats_fd(vcpu)?)
}

/// Opens the binary statistics of a vCPU (`anon_inode:kvm-vcpu-stats:N`). Only the process
/// that created the VM may open it (KVM refuses others with EIO), but once open it can be
/// read from anywhere: a running VMM keeps one per vCPU so that the host daemon can read its
/// counters live (duplicating it with `pidfd_getfd`).
pub fn stats_fd(vcpu: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
    let raw = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The cumulative counters behind a descriptor from [`stats_fd`].
pub fn read_counters(stats: &OwnedFd) -> io::Result<Vec<(String, u64)>> {
    parse(&mut |buf, off| pread_all(stats, buf, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        // Header, id "kvm-1" (name_size 8), two descriptors, data.
        let name_size = 8usize;
        let desc_off = HEADER + name_size;
        let data_off = desc_off + 2 * (DESC + name_size);
        let mut b = vec![0u8; data_off + 16];
        b[4..8].copy_from_slice(&(name_size as u32).to_le_bytes());
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(desc_off as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(data_off as u32).to_le_bytes());
        let mut put_desc = |i: usize, flags: u32, off: u32, name: &[u8]| {
            let d = desc_off + i * (DESC + name_size);
            b[d..d + 4].copy_from_slice(&flags.to_le_bytes());
            b[d + 6..d + 8].copy_from_slice(&1u16.to_le_bytes());
            b[d + 8..d + 12].copy_from_slice(&off.to_le_bytes());
            b[d + DESC..d + DESC + name.len()].copy_from_slice(name);
        };
        put_desc(0, KVM_STATS_TYPE_CUMULATIVE, 0, b"exits");
        put_desc(1, 1, 8, b"peakval"); // an instant value: skipped
        b[data_off..data_off + 8].copy_from_slice(&42u64.to_le_bytes());
        b
    }

    #[test]
    fn parses_cumulative_counters() {
        let img = image();
        let mut read = |buf: &mut [u8], off: u64| -> io::Result<()> {
            let o = off as usize;
            buf.copy_from_slice(
                img.get(o..o + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        };
        assert_eq!(parse(&mut read).unwrap(), vec![("exits".to_string(), 42)]);
    }

    #[test]
    fn truncated_image_is_an_error() {
        let img = image();
        let short = &img[..30];
        let mut read = |buf: &mut [u8], off: u64| -> io::Result<()> {
            let o = off as usize;
            buf.copy_from_slice(
                short
                    .get(o..o + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        };
        assert!(parse(&mut read).is_err());
    }
}
