//! Console output: lines are assembled in a buffer and sent either through one VMM console
//! call (on Worldvisor) or byte by byte to the 16550 UART at 0x3f8 (natively). No `core::fmt`:
//! every instruction in kernel mode is emulated on our CI machines, so formatting is by hand.

use crate::pv;
use crate::sync::SpinLock;
use core::arch::asm;
use wv_abi::Call;

const COM1: u16 = 0x3f8;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nostack, preserves_flags)) }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for outb.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, preserves_flags)) }
    v
}

/// Sends one byte to the UART, waiting for the transmitter (bounded, so a missing UART
/// cannot hang the guest).
pub fn uart_putb(b: u8) {
    for _ in 0..10_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// A line under construction.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Line {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
    /// Appends a string.
    pub fn s(&mut self, s: &str) -> &mut Line {
        for &b in s.as_bytes() {
            self.b(b);
        }
        self
    }
    /// Appends a byte.
    pub fn b(&mut self, b: u8) -> &mut Line {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
        self
    }
    /// Appends bytes.
    pub fn bytes(&mut self, s: &[u8]) -> &mut Line {
        for &b in s {
            self.b(b);
        }
        self
    }
    /// Appends an unsigned decimal number.
    pub fn dec(&mut self, mut v: u64) -> &mut Line {
        let mut d = [0u8; 20];
        let mut n = 0;
        loop {
            d[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.b(d[n]);
        }
        self
    }
    /// Appends a hexadecimal number with a 0x prefix.
    pub fn hex(&mut self, v: u64) -> &mut Line {
        self.s("0x");
        let mut started = false;
        for i in (0..16).rev() {
            let nib = ((v >> (i * 4)) & 0xf) as u8;
            if nib != 0 || started || i == 0 {
                started = true;
                self.b(if nib < 10 {
                    b'0' + nib
                } else {
                    b'a' + nib - 10
                });
            }
        }
        self
    }
    /// The bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    /// Sends the line followed by a newline.
    pub fn end(&mut self) {
        self.b(b'\n');
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

static CONSOLE_LOCK: SpinLock = SpinLock::new();

/// Writes bytes to the console in one piece: one VMM call, or the UART natively.
pub fn write_bytes(bytes: &[u8]) {
    let _g = CONSOLE_LOCK.lock();
    if pv::on_worldvisor() {
        let (st, _, _) = pv::call_args(
            Call::ConsoleWrite,
            [bytes.as_ptr() as u64, bytes.len() as u64, 0, 0, 0],
        );
        if st == wv_abi::status::OK {
            return;
        }
    }
    for &b in bytes {
        uart_putb(b);
    }
}

/// Prints a string followed by a newline.
pub fn println(s: &str) {
    Line::new().s(s).end();
}
