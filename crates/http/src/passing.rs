//! Files passed with a request over a Unix socket (SCM_RIGHTS): how the daemon hands a jailed
//! VMM what it can no longer open itself (a migration's connection, a backend's new socket).
//! The request names each file in its query string, in the order they are passed:
//! `PUT /vm/files?file=KEY&file=KEY` (each KEY %-encoded), and the VMM leaves them in its
//! table of handed-over files under those names (crates/fds).
use crate::Timed;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Most files one request may pass.
pub const MAX_FILES: usize = 8;

/// The space of a control message holding [`MAX_FILES`] descriptors.
const CMSG_BUF: usize = 64;

/// A Unix stream read with recvmsg, keeping the descriptors that arrive with the bytes.
pub struct FdStream {
    inner: UnixStream,
    files: Vec<OwnedFd>,
    /// More came than [`MAX_FILES`] (those were closed), or the message was cut.
    pub refused: bool,
}

impl FdStream {
    /// Reads `inner` keeping passed descriptors.
    pub fn new(inner: UnixStream) -> FdStream {
        FdStream {
            inner,
            files: Vec::new(),
            refused: false,
        }
    }

    /// The descriptors passed so far, in order.
    pub fn take_files(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.files)
    }
}

impl Read for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; CMSG_BUF / 8];
        // SAFETY: msghdr is plain data; zero is valid for every field, set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_BUF;
        // SAFETY: recvmsg into our buffer and control buffer, both valid for their lengths.
        let n = unsafe { libc::recvmsg(self.inner.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            self.refused = true;
        }
        // SAFETY: walking the control messages recvmsg wrote, with the kernel's macros; each
        // SCM_RIGHTS payload is an array of descriptors now ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                        if self.files.len() < MAX_FILES {
                            self.files.push(fd);
                        } else {
                            self.refused = true;
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        usize::try_from(n).map_err(|_| std::io::ErrorKind::InvalidData.into())
    }
}

impl Write for FdStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Timed for FdStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout(t)
    }
    fn split(&self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        Ok((
            Box::new(self.inner.try_clone()?),
            Box::new(self.inner.try_clone()?),
        ))
    }
}

/// Sends all of `data` on `s`, passing `files` with its first bytes.
pub fn send_with_files(
    s: &UnixStream,
    data: &[u8],
    files: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    if files.len() > MAX_FILES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("at most {MAX_FILES} files per request"),
        ));
    }
    let mut cbuf = [0u64; CMSG_BUF / 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is valid for every field, set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // At most MAX_FILES descriptors: a few dozen bytes.
    let bytes = u32::try_from(std::mem::size_of_val(files)).unwrap_or(u32::MAX);
    if !files.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the buffer holds MAX_FILES descriptors.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        // SAFETY: the first header of our control buffer, which is large enough; its data is
        // the descriptors' numbers.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let d = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, f) in files.iter().enumerate() {
                d.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    // SAFETY: sendmsg of our buffers, valid for their lengths.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    (&*s).write_all(&data[n..])
}

/// %-encodes a file's name for the query string (everything but unreserved characters).
pub fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The names the query string `query` gives the passed files (`file=KEY`, in order).
pub fn file_keys(query: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let Some(v) = part.strip_prefix("file=") else {
            return Err(format!("unknown query parameter '{part}' (file=NAME only)"));
        };
        let k = crate::segments(&format!("/{v}"))
            .ok()
            .and_then(|s| s.into_iter().next())
            .filter(|k| !k.is_empty() && k.len() <= 4096)
            .ok_or_else(|| format!("file={v}: not a %-encoded name"))?;
        keys.push(k);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_arrive_with_the_bytes_and_keys_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/zero").unwrap();
        let g = std::fs::File::open("/dev/null").unwrap();
        let msg = b"PUT /vm/files?file=%2Fdev%2Fzero HTTP/1.1\r\n\r\n";
        send_with_files(&a, msg, &[f.as_fd(), g.as_fd()]).unwrap();
        let mut r = FdStream::new(b);
        let mut got = vec![0u8; msg.len()];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &msg[..]);
        let files = r.take_files();
        assert_eq!(files.len(), 2);
        assert!(!r.refused);
        let mut z = std::fs::File::from(files.into_iter().next().unwrap());
        let mut buf = [1u8; 3];
        z.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0; 3]);
        let k = "/var/lib/wv/a b,c%.sock";
        assert_eq!(
            file_keys(&format!("file={}&file=x", encode_key(k))).unwrap(),
            vec![k.to_string(), "x".into()]
        );
        assert!(file_keys("other=1").is_err());
        assert!(file_keys("file=").is_err());
    }

    use std::os::fd::AsFd;
}
