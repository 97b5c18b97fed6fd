//! The probe guest images, built from `guest/` at compile time and embedded, so `wv run`
//! boots a guest with nothing downloaded.

/// The probe guest as a PVH ELF (what QEMU's `-kernel` and `wv run --kernel` accept).
pub static PROBE_PVH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.pvh.elf"));

/// The same guest as a bzImage (Linux boot protocol, 64-bit entry).
pub static PROBE_BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.bzImage"));

/// The start-up/exit benchmark guest (PVH ELF; the command line is the number of port writes).
pub static EXITBENCH_PVH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/exitbench.pvh.elf"));

/// A named image.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "pvh" => Some(PROBE_PVH),
        "bzimage" => Some(PROBE_BZIMAGE),
        "exitbench" => Some(EXITBENCH_PVH),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_have_their_formats() {
        assert_eq!(&PROBE_PVH[..4], b"\x7fELF");
        assert_eq!(&EXITBENCH_PVH[..4], b"\x7fELF");
        assert_eq!(&PROBE_BZIMAGE[0x202..0x206], b"HdrS");
        assert_eq!(
            u16::from_le_bytes([PROBE_BZIMAGE[0x1fe], PROBE_BZIMAGE[0x1ff]]),
            0xaa55
        );
    }
}
