//! The snapshot reader (`wv_vmm::check_snapshot_state`: `snapshot::Sections::decode`, then the
//! `config` section validated, then the `machine`, `vm`, `vcpu.N`, `devices` and `disks`
//! sections parsed and checked against it, as `wv run --restore` does before it builds the VM)
//! on a state file from the input: either the input itself (odd first byte), or sections the
//! input names and fills, encoded with their checksums right so that the JSON parsers behind
//! them are reached. An error or a state, never a panic; what decodes encodes back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wv_vmm::snapshot::Sections;

const NAMES: [&str; 8] = [
    "machine", "config", "vm", "vcpu.0", "vcpu.1", "devices", "disks", "x",
];
/// The host's RAM as the reader is told it (the configuration's memory must fit).
const HOST_RAM: u64 = 64 << 20;

/// Sections from `data`: (name selector u8, length u16 LE, bytes) each.
fn sections(mut data: &[u8]) -> Sections {
    let mut s = Sections::default();
    while data.len() >= 3 {
        let name = NAMES[usize::from(data[0] & 7)];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
        s.push(name, data[3..3 + len].to_vec());
        data = &data[3 + len..];
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        sections(rest).encode()
    };
    if let Ok(s) = Sections::decode(&file) {
        assert_eq!(Sections::decode(&s.encode()).as_ref(), Ok(&s));
        assert!(s.0.iter().map(|(_, d)| d.len()).sum::<usize>() <= file.len());
    }
    if let Ok(cfg) = wv_vmm::check_snapshot_state(&file, HOST_RAM) {
        assert!(cfg.memory <= HOST_RAM && cfg.vcpus >= 1);
    }
});
