//! vhost-user messages as the switch receives them: a `wv_vswitch::PortBackend` served by
//! rust-vmm's `vhost-user-backend` (the handler `wv vswitch` runs for each VM port) over a
//! Unix socket, the frontend played by the input: a list of messages (owner, features,
//! protocol features, memory tables and added regions whose memfds may be shorter than the
//! regions, vring numbers, addresses, bases, kick/call/err eventfds, enables, config, and any
//! request code with any flags and payload). The memfds hold input bytes, so the rings the
//! messages point at have hostile contents; the queues are kicked at the end. The backend must
//! neither panic nor touch a mapping past its file (which would be a SIGBUS: the switch's
//! `update_memory` refuses such tables), and the connection must end when the frontend goes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use wv_vswitch::{Config, NetworkConfig, PortBackend, Switch};

/// The requests the input picks from (by index), then any code.
const REQS: [u32; 24] = [
    1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 36, 37, 38, 6, 7, 0,
];
/// Where the frontend says each region is mapped in its own address space.
const USER_BASE: u64 = 0x7f00_0000_0000;

fn listener() -> &'static Mutex<(Listener, std::path::PathBuf)> {
    static L: OnceLock<Mutex<(Listener, std::path::PathBuf)>> = OnceLock::new();
    L.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("wv-fuzz-vhost-{}.sock", std::process::id()));
        Mutex::new((Listener::new(&p, true).unwrap(), p))
    })
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// A memfd of `pages` pages holding `fill` at its start.
fn memfd(pages: u64, fill: &[u8]) -> OwnedFd {
    // SAFETY: memfd_create reads a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"wv-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nothing else owns.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(pages * 4096).unwrap();
    let n = fill.len().min(usize::try_from(pages * 4096).unwrap());
    f.write_all(&fill[..n]).unwrap();
    f.into()
}

/// A region (gpa, size, user address, offset) for region slot `i`, sizes in pages unless the
/// input says otherwise; the file's own size is chosen separately.
fn region(inp: &mut Input, i: u64, p: &mut Vec<u8>) {
    let gpa = u64::from(inp.u16()) * 4096;
    let size = match inp.u8() {
        0xff => inp.u64(),
        n => u64::from(n % 32) * 4096,
    };
    let offset = u64::from(inp.u8() % 8) * 4096;
    for v in [gpa, size, USER_BASE + (i << 30), offset] {
        p.extend_from_slice(&v.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let sw = Switch::new(&Config {
        socket_dir: "/nonexistent".into(),
        networks: vec![NetworkConfig {
            name: "n".into(),
            ports: vec!["a".into(), "b".into()],
            uplink: None,
        }],
    })
    .unwrap();
    let backend = PortBackend::new(sw, 0).expect("port 0 exists");
    let mut daemon = VhostUserDaemon::new(
        "fuzz".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let mut l = listener().lock().unwrap();
    let conn = UnixStream::connect(&l.1).unwrap();
    daemon.start(&mut l.0).unwrap();
    let mut inp = Input(data);
    let mut kicks: Vec<EventFd> = Vec::new();
    // Replies are left unread: few enough messages that they fit the socket's buffer.
    for _ in 0..48 {
        if inp.0.is_empty() {
            break;
        }
        let op = inp.u8();
        let req = match REQS[usize::from(op & 0x1f) % REQS.len()] {
            0 => inp.u32() & 0xff,
            r => r,
        };
        let flags = if op & 0x20 != 0 {
            inp.u32()
        } else {
            1 | (u32::from(op >> 6 & 1) << 3)
        };
        let mut p = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        let fill = |inp: &mut Input| {
            let pages = u64::from(inp.u8() % 16);
            let n = usize::from(inp.u8()) * 16;
            memfd(pages, inp.bytes(n))
        };
        match req {
            2 | 16 | 6 => p.extend_from_slice(&inp.u64().to_le_bytes()),
            5 => {
                let n = u32::from(inp.u8() % 4);
                p.extend_from_slice(&n.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for i in 0..u64::from(n) {
                    region(&mut inp, i, &mut p);
                    fds.push(fill(&mut inp));
                }
            }
            37 | 38 => {
                p.extend_from_slice(&0u64.to_le_bytes());
                let i = u64::from(inp.u8() % 4);
                region(&mut inp, i, &mut p);
                if req == 37 {
                    fds.push(fill(&mut inp));
                }
            }
            8 | 10 | 11 | 18 => {
                p.extend_from_slice(&u32::from(inp.u8() % 3).to_le_bytes());
                p.extend_from_slice(&u32::from(inp.u16()).to_le_bytes());
            }
            9 => {
                p.extend_from_slice(&u32::from(inp.u8() % 3).to_le_bytes());
                p.extend_from_slice(&u32::from(inp.u8() & 1).to_le_bytes());
                for _ in 0..3 {
                    let at = USER_BASE + (u64::from(inp.u8() % 4) << 30) + u64::from(inp.u16());
                    p.extend_from_slice(&at.to_le_bytes());
                }
                p.extend_from_slice(&inp.u64().to_le_bytes());
            }
            12..=14 => {
                let i = u64::from(inp.u8());
                let no_fd = i & 0x80 != 0;
                p.extend_from_slice(&((i & 3) | if no_fd { 0x100 } else { 0 }).to_le_bytes());
                if !no_fd {
                    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                    // SAFETY: dup of a live eventfd; the copy is owned here.
                    fds.push(unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) });
                    if req == 12 {
                        kicks.push(e);
                    }
                }
            }
            24 | 25 => {
                p.extend_from_slice(&u32::from(inp.u8()).to_le_bytes());
                let n = u32::from(inp.u8());
                p.extend_from_slice(&n.to_le_bytes());
                p.extend_from_slice(&inp.u32().to_le_bytes());
                let n = usize::try_from(n).unwrap();
                p.extend_from_slice(inp.bytes(n));
            }
            _ => {
                let n = usize::from(inp.u8());
                p.extend_from_slice(inp.bytes(n));
                if op & 0x80 != 0 {
                    fds.push(fill(&mut inp));
                }
            }
        }
        let size = if op & 0x80 != 0 && !matches!(req, 5 | 37) {
            u32::from(inp.u8())
        } else {
            p.len() as u32
        };
        let mut msg = Vec::with_capacity(12 + p.len());
        for v in [req, flags, size] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        msg.extend_from_slice(&p);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if conn.send_with_fds(&[msg.as_slice()], &raw).is_err() {
            break;
        }
    }
    for k in &kicks {
        let _ = k.write(1);
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    if let Err(vhost_user_backend::Error::WaitDaemon(e)) = daemon.wait() {
        panic!("the request handler panicked: {e:?}");
    }
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    backend.reset_device();
    drop(daemon);
    backend.close_exit_events();
    drop(l);
});
