//! The migration stream decoder, target side (`wv_vmm::migrate::read_stream_into`: header,
//! page and zero records, the post-copy list, the disks hand-over record, version 3's copied
//! disks and their block and zero records, CRCs, the state record and its sections), fed
//! either the input itself (odd first byte) or records the input describes, written with
//! their checksums right (unless the input says to spoil one) so that the decoder gets past
//! them. Guest memory is small (the host has 8 MiB). Every disk record that reaches the sink
//! must name a declared disk, whole sectors, inside it; nothing may panic, and no buffer
//! sized by a claimed length may outgrow what was sent (run with `-malloc_limit_mb`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use wv_vmkfs::crc::crc32c;
use wv_vmm::migrate::{read_stream_into, CopiedDisk, DiskSink, MAGIC};
use wv_vmm::snapshot::Sections;

const HOST_RAM: u64 = 8 << 20;

/// Keeps what the stream declares and writes, and checks each call against the declarations.
#[derive(Default)]
struct Sink {
    disks: BTreeMap<usize, u64>,
    written: u64,
}

impl DiskSink for Sink {
    fn create(&mut self, d: &CopiedDisk) -> Result<(), String> {
        assert!(d.size > 0 && d.size % 512 == 0, "{d:?}");
        assert!(self.disks.insert(d.index, d.size).is_none(), "{d:?} twice");
        Ok(())
    }
    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        let size = self.disks[&index];
        let len = data.len() as u64;
        assert!(len > 0 && len % 512 == 0 && offset % 512 == 0);
        assert!(offset + len <= size, "{offset}+{len} past {size}");
        self.written += len;
        Ok(())
    }
    fn zero(&mut self, index: usize, offset: u64, len: u64) -> Result<(), String> {
        let size = self.disks[&index];
        assert!(len > 0 && len % 512 == 0 && offset % 512 == 0);
        assert!(offset.checked_add(len).is_some_and(|e| e <= size));
        Ok(())
    }
}

/// Reads the input a few bytes at a time (zeros once it is used up).
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
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.iter_mut().for_each(|x| *x = self.u8());
        u64::from_le_bytes(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn put32(o: &mut Vec<u8>, v: u32) {
    o.extend_from_slice(&v.to_le_bytes());
}
fn put64(o: &mut Vec<u8>, v: u64) {
    o.extend_from_slice(&v.to_le_bytes());
}

/// A stream built from the input's description of its records.
fn build(inp: &mut Input) -> Vec<u8> {
    let mut o = MAGIC.to_vec();
    let v = inp.u8();
    put32(&mut o, u32::from(v % 4));
    put32(&mut o, 0);
    let memory = match inp.u8() % 4 {
        0 => 4 << 20,
        1 => 8 << 20,
        2 => (4 << 20) + 4096 * u64::from(inp.u8()),
        _ => inp.u64(),
    };
    put64(&mut o, memory);
    while !inp.0.is_empty() && o.len() < 1 << 22 {
        let op = inp.u8();
        let spoil = op & 0x80 != 0;
        // A length in pages or sectors, now and then arbitrary.
        let len = |inp: &mut Input, unit: u64| match inp.u8() {
            0xff => inp.u64(),
            n => u64::from(n % 8 + 1) * unit,
        };
        match op % 11 {
            0 => {
                put32(&mut o, 1);
                let gpa = u64::from(inp.u16()) * 4096;
                let n = len(inp, 4096);
                put64(&mut o, gpa);
                put64(&mut o, n);
                let fill = inp.u8();
                let data = vec![fill; usize::try_from(n.min(1 << 20)).unwrap()];
                put32(&mut o, crc32c(&data) ^ u32::from(spoil));
                o.extend_from_slice(&data);
            }
            1 => {
                put32(&mut o, 2);
                put64(&mut o, u64::from(inp.u16()) * 4096);
                let n = len(inp, 4096);
                put64(&mut o, n);
            }
            2 => {
                put32(&mut o, 5);
                let n = inp.u8();
                put64(&mut o, u64::from(n));
                for _ in 0..n {
                    put64(&mut o, u64::from(inp.u16()) * 4096);
                }
            }
            3 => {
                put32(&mut o, 6);
                let n = usize::from(inp.u8());
                let json = inp.bytes(n).to_vec();
                put32(&mut o, json.len() as u32);
                o.extend_from_slice(&json);
            }
            4 => {
                let d = CopiedDisk {
                    index: usize::from(inp.u8() % 80),
                    id: "d".into(),
                    vmkfs: inp.u8() & 1 == 1,
                    name: "disk.img".into(),
                    size: match inp.u8() % 3 {
                        0 => 1 << 20,
                        1 => u64::from(inp.u16()) * 512,
                        _ => inp.u64(),
                    },
                };
                let json = serde_json::to_vec(&d).unwrap();
                put32(&mut o, 7);
                put32(&mut o, json.len() as u32);
                o.extend_from_slice(&json);
            }
            5 => {
                put32(&mut o, 8);
                put32(&mut o, u32::from(inp.u8() % 80));
                put64(&mut o, u64::from(inp.u16()) * 512);
                let n = len(inp, 512);
                put64(&mut o, n);
                let data = vec![inp.u8(); usize::try_from(n.min(1 << 20)).unwrap()];
                put32(&mut o, crc32c(&data) ^ u32::from(spoil));
                o.extend_from_slice(&data);
            }
            6 => {
                put32(&mut o, 9);
                put32(&mut o, u32::from(inp.u8() % 80));
                put64(&mut o, u64::from(inp.u16()) * 512);
                let n = len(inp, 512);
                put64(&mut o, n);
            }
            7 => {
                let mut s = Sections::default();
                s.push("machine", inp.bytes(16).to_vec());
                let st = s.encode();
                put32(&mut o, 3);
                put64(&mut o, st.len() as u64);
                o.extend_from_slice(&st);
            }
            8 => {
                // A state record claiming more than it holds.
                put32(&mut o, 3);
                put64(&mut o, inp.u64());
            }
            9 => put32(&mut o, 4),
            _ => {
                let t = u32::from(inp.u8());
                put32(&mut o, t);
            }
        }
    }
    o
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        build(&mut Input(rest))
    };
    let mut sink = Sink::default();
    if let Ok(got) = read_stream_into(stream.as_slice(), HOST_RAM, &mut sink) {
        use vm_memory::GuestMemoryBackend;
        let total: u64 = got.mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
        assert!(total <= HOST_RAM);
        assert!(got.bytes <= stream.len() as u64);
        assert_eq!(got.copied.len(), sink.disks.len());
        assert!(sink.written <= stream.len() as u64);
    }
});
