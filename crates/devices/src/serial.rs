//! The 16550A UART (vm-superio's model) on COM1, its interrupt line, the console output it
//! shares with the paravirtual console call, and its saved state ([`SerialDeviceState`]).
#![allow(clippy::cast_possible_truncation)] // register offsets are checked below 8 first

use crate::bus::{DeviceAction, PioDevice};
use crate::snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, SerialState, Trigger};
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

/// The receive FIFO's capacity in vm-superio's model.
const FIFO_SIZE: usize = 64;

/// The UART's registers and unread input (vm-superio's `SerialState`, as plain data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl Snapshot for SerialDevice {
    type State = SerialDeviceState;

    fn save(&self) -> Result<SerialDeviceState, String> {
        let s = self.uart.state();
        Ok(SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// Rebuilds the UART from `state` on the same interrupt line and console output; the
    /// model raises the line at once if the restored registers say an interrupt is due.
    fn restore(&mut self, state: SerialDeviceState) -> Result<(), String> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "serial state: {} bytes of pending input, more than the {FIFO_SIZE}-byte FIFO",
                state.in_buffer.len()
            ));
        }
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        };
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial state: cloning the interrupt eventfd: {e}"))?;
        // Built writing nowhere, then handed the real output: a failure leaves it in place.
        let mut uart = Serial::from_state(&s, IrqLine(irq), NoEvents, ConsoleOut::Sink)
            .map_err(|e| format!("serial state: {e:?}"))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
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
    fn state_round_trips_through_json_with_registers_and_pending_input() {
        let p = std::env::temp_dir().join(format!("wv-serial-st-{}", std::process::id()));
        let mut s = uart_to(&p);
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x0c]); // divisor 12: 9600 baud
        s.write(3, &[0x03]); // 8N1
        s.write(7, &[0xa5]);
        s.write(1, &[0x01]); // receive interrupt on
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let mut d = [0u8];
        let saved = s.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        assert_eq!(back.in_buffer, b"abc");

        // A fresh UART on the same output comes back with the same registers and input.
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq_probe = irq.try_clone().unwrap();
        let mut t = SerialDevice::new(IrqLine(irq), ConsoleOut::File(File::create(&p).unwrap()));
        t.restore(back).unwrap();
        assert_eq!(t.save().unwrap(), saved);
        assert_eq!(
            irq_probe.read().unwrap(),
            1,
            "a pending receive interrupt raises the line again"
        );
        s.read(7, &mut d);
        let mut e = [0u8];
        t.read(7, &mut e);
        assert_eq!((d[0], e[0]), (0xa5, 0xa5));
        t.read(0, &mut e);
        assert_eq!(e[0], b'a');
        t.write(3, &[0x83]);
        t.read(0, &mut e);
        assert_eq!(e[0], 0x0c, "divisor latch");
        t.write(3, &[0x03]);
        t.write(0, b"!");
        t.console_write(b"?").unwrap();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"!?",
            "output still goes to the console"
        );

        // More input than the FIFO holds is refused and changes nothing.
        let before = t.save().unwrap();
        let bad = SerialDeviceState {
            in_buffer: vec![0; 65],
            ..before.clone()
        };
        let err = t.restore(bad).unwrap_err();
        assert!(err.contains("FIFO"), "{err}");
        assert_eq!(t.save().unwrap(), before);
        std::fs::remove_file(&p).unwrap();
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
