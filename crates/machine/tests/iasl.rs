//! The ACPI tables pass ACPICA's disassembler (`iasl -d`, Debian's acpica-tools, which
//! scripts/test installs) without errors, for 1, 4 and 32 vCPUs.

use std::process::Command;
use wv_machine::acpi::{build, ACPI_START};

#[test]
fn iasl_disassembles_every_table_without_errors() {
    for cpus in [1u8, 4, 32] {
        let blob = build(cpus).unwrap();
        let dir = std::env::temp_dir().join(format!("wv-acpi-{}-{cpus}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let table = |addr: u64| {
            let at = usize::try_from(addr - ACPI_START).unwrap();
            let len = u32::from_le_bytes(blob[at + 4..at + 8].try_into().unwrap()) as usize;
            &blob[at..at + len]
        };
        let xsdt = table(u64_at(&blob, 24));
        let mut tables = vec![xsdt];
        for off in (36..xsdt.len()).step_by(8) {
            tables.push(table(u64_at(xsdt, off)));
        }
        let fadt = tables[1];
        tables.push(table(u64_at(fadt, 140)));
        for t in tables {
            let sig = String::from_utf8_lossy(&t[..4]).to_string();
            let file = dir.join(format!("{sig}.dat"));
            std::fs::write(&file, t).unwrap();
            let out = Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run iasl (scripts/test installs Debian's acpica-tools): {e}")
                });
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "iasl -d {sig} ({cpus} vCPUs):\n{text}"
            );
            assert!(
                !text.contains("Error") && !text.contains("Warning"),
                "iasl -d {sig} ({cpus} vCPUs):\n{text}"
            );
            let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap();
            assert!(!dsl.is_empty());
            if sig == "DSDT" {
                // The hot-plug contract (docs/DEVICES.md) as iasl reads it back.
                for want in [
                    "Device (PHPR)",
                    "Device (GED)",
                    "_HID, \"ACPI0013\"",
                    "Method (_EVT, 1, Serialized)",
                    "Method (PCNT, 0, Serialized)",
                    "Notify (S1F, 0x03)",
                    "Method (_EJ0, 1, NotSerialized)",
                    "OperationRegion (PCST, SystemIO, 0x0610, 0x10)",
                    "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                ] {
                    assert!(dsl.contains(want), "DSDT lacks {want}:\n{dsl}");
                }
            }
        }
        if std::env::var_os("WV_KEEP_ACPI").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
