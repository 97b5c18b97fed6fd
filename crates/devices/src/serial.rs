//! The 16550A UART (vm-superio's model) on COM1, its interrupt line, and the console output it
//! shares with the paravirtual console call.
#![allow(clippy::cast_possible_truncation)] // register offsets are checked below 8 first

use crate::bus::{DeviceAction, PioDevice};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;

/// An interrupt line: an eventfd registered with KVM as an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// How much recent output an attaching console client is shown first.
pub const CONSOLE_REPLAY: usize = 4096;

/// The interactive console's side of the output: the recent bytes (replayed to a client that
/// attaches) and the attached client, if any.
#[derive(Default)]
pub struct Attach {
    recent: VecDeque<u8>,
    client: Option<UnixStream>,
}

impl Attach {
    /// Attaches `client` (non-blocking) after sending it the recent output; false (and nothing
    /// changes) when another client is attached already.
    pub fn attach(&mut self, mut client: UnixStream) -> bool {
        if self.client.is_some() {
            let _ = client.write_all(b"\r\n[wv: another client is attached to this console]\r\n");
            return false;
        }
        let (a, b) = self.recent.as_slices();
        if client
            .write_all(a)
            .and_then(|_| client.write_all(b))
            .is_err()
            || client.set_nonblocking(true).is_err()
        {
            return false;
        }
        self.client = Some(client);
        true
    }

    /// Forgets the client (it hung up).
    pub fn detach(&mut self) {
        self.client = None;
    }

    fn output(&mut self, buf: &[u8]) {
        self.recent.extend(buf);
        let excess = self.recent.len().saturating_sub(CONSOLE_REPLAY);
        self.recent.drain(..excess);
        if let Some(c) = &mut self.client {
            // A slow client loses output rather than stall the vCPU; the log keeps it all.
            match c.write(buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.client = None,
            }
        }
    }
}

/// Where console output goes.
pub enum ConsoleOut {
    /// The VMM's standard output.
    Stdout,
    /// A file.
    File(File),
    /// Nowhere.
    Sink,
    /// Somewhere, and to the interactive console.
    Tee(Box<ConsoleOut>, Arc<Mutex<Attach>>),
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(buf)?;
                o.flush()?;
                Ok(buf.len())
            }
            ConsoleOut::File(f) => f.write(buf),
            ConsoleOut::Sink => Ok(buf.len()),
            ConsoleOut::Tee(out, attach) => {
                out.write_all(buf)?;
                attach.lock().unwrap_or_else(|p| p.into_inner()).output(buf);
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOut::File(f) => f.flush(),
            ConsoleOut::Tee(out, _) => out.flush(),
            _ => Ok(()),
        }
    }
}

/// COM1.
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, ConsoleOut>,
    lost: u64,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: IrqLine, out: ConsoleOut) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(irq, out),
            lost: 0,
        }
    }

    /// Writes bytes to the console output in one piece (the paravirtual console call).
    pub fn console_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let out = self.uart.writer_mut();
        out.write_all(bytes)
            .and_then(|_| out.flush())
            .inspect_err(|_| self.lost += bytes.len() as u64)
    }

    /// Queues input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Bytes that could not be written to the output.
    pub fn lost_bytes(&self) -> u64 {
        self.lost
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if data.len() == 1 && offset < 8 && self.uart.write(offset as u8, data[0]).is_err() {
            self.lost += 1;
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uart_to(path: &std::path::Path) -> SerialDevice {
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        SerialDevice::new(irq, ConsoleOut::File(File::create(path).unwrap()))
    }

    #[test]
    fn bytes_and_console_calls_share_the_output() {
        let p = std::env::temp_dir().join(format!("wv-serial-{}", std::process::id()));
        let mut s = uart_to(&p);
        s.write(0, b"h");
        s.write(0, b"i");
        s.console_write(b" there").unwrap();
        // Scratch register round-trips; LSR says the transmitter is empty.
        s.write(7, &[0x5a]);
        let mut d = [0u8];
        s.read(7, &mut d);
        assert_eq!(d[0], 0x5a);
        s.read(5, &mut d);
        assert_ne!(d[0] & 0x20, 0);
        // Wide accesses are not UART accesses: they read all ones and write nothing.
        let mut w = [0u8; 2];
        s.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        s.write(0, b"xx");
        assert_eq!(std::fs::read(&p).unwrap(), b"hi there");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn console_clients_get_the_recent_output_then_the_rest() {
        use std::io::Read;
        let attach = Arc::new(Mutex::new(Attach::default()));
        let mut out = ConsoleOut::Tee(Box::new(ConsoleOut::Sink), attach.clone());
        out.write_all(&vec![b'x'; CONSOLE_REPLAY]).unwrap();
        out.write_all(b"banner").unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        assert!(attach.lock().unwrap().attach(ours));
        out.write_all(b" and more").unwrap();
        let (second, mut refused) = UnixStream::pair().unwrap();
        assert!(!attach.lock().unwrap().attach(second));
        let mut buf = vec![0u8; CONSOLE_REPLAY + 9];
        theirs.read_exact(&mut buf).unwrap();
        assert!(buf.starts_with(b"xxxx"));
        assert!(
            buf.ends_with(b"banner and more"),
            "the oldest bytes were dropped"
        );
        let mut msg = String::new();
        refused.read_to_string(&mut msg).unwrap();
        assert!(msg.contains("another client"));
        // A client that hung up is forgotten; output continues.
        drop(theirs);
        out.write_all(b"x").unwrap();
        out.write_all(b"y").unwrap();
        assert!(attach.lock().unwrap().client.is_none());
    }

    #[test]
    fn input_reaches_the_receive_register() {
        let p = std::env::temp_dir().join(format!("wv-serial-in-{}", std::process::id()));
        let mut s = uart_to(&p);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        let mut d = [0u8];
        s.read(5, &mut d);
        assert_ne!(d[0] & 1, 0, "data ready");
        s.read(0, &mut d);
        assert_eq!(d[0], b'o');
        std::fs::remove_file(&p).unwrap();
    }
}
