#![allow(clippy::cast_possible_truncation)] // sizes of our own small guest image
//! Builds the probe guest (guest/) for x86_64-unknown-none with a nested cargo and turns it into
//! the two images `wv` embeds: the PVH ELF as linked, and a bzImage (Linux boot protocol 2.12
//! setup header + the flat protected-mode image, 64-bit entry at offset 0x200).

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.join("../..").canonicalize().unwrap();
    let guest = root.join("guest");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for p in ["src", "link.ld", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("crates/abi/src").display()
    );

    ensure_target();
    let target_dir = out.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let flags = [
        "-Crelocation-model=static".to_string(),
        format!("-Clink-arg=-T{}", guest.join("link.ld").display()),
        "-Clink-arg=--no-pie".to_string(),
        "-Clink-arg=-znorelro".to_string(),
    ]
    .join("\x1f");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-none",
            "--bins",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags);
    for var in [
        "RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_LLVM_COV",
        "RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the probe guest");
    if !status.success() {
        panic!(
            "building the probe guest failed (guest/). If the target is missing: \
             rustup target add x86_64-unknown-none"
        );
    }
    let bin_dir = target_dir.join("x86_64-unknown-none/release");
    let probe = fs::read(bin_dir.join("probe")).unwrap();
    fs::write(out.join("probe.pvh.elf"), &probe).unwrap();
    fs::write(out.join("probe.bzImage"), bzimage(&probe)).unwrap();
    fs::copy(bin_dir.join("exitbench"), out.join("exitbench.pvh.elf")).unwrap();
}

/// Installs the guest's target through rustup when it is missing, so that a plain `cargo build`
/// works on a fresh machine (rustup does not add a toolchain file's targets to a toolchain that
/// is already installed).
fn ensure_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok();
    let installed = sysroot.is_some_and(|o| {
        let root = String::from_utf8_lossy(&o.stdout).trim().to_string();
        PathBuf::from(root)
            .join("lib/rustlib/x86_64-unknown-none")
            .exists()
    });
    if installed {
        return;
    }
    println!(
        "cargo:warning=installing the x86_64-unknown-none target for the probe guest (rustup)"
    );
    let ok = Command::new("rustup")
        .args(["target", "add", "x86_64-unknown-none"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!("the probe guest needs the x86_64-unknown-none target: rustup target add x86_64-unknown-none");
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Wraps the ELF's single PT_LOAD segment (linked at 1 MiB) as a bzImage.
fn bzimage(elf: &[u8]) -> Vec<u8> {
    assert_eq!(&elf[0..4], b"\x7fELF", "guest is not an ELF");
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16_at(elf, 0x36) as usize;
    let phnum = u16_at(elf, 0x38) as usize;
    let mut load = None;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..];
        if u32_at(ph, 0) == 1 {
            assert!(
                load.is_none(),
                "guest must have exactly one PT_LOAD segment"
            );
            load = Some((
                u64_at(ph, 8),
                u64_at(ph, 24),
                u64_at(ph, 32),
                u64_at(ph, 40),
            ));
        }
    }
    let (offset, paddr, filesz, memsz) = load.expect("guest has no PT_LOAD segment");
    assert_eq!(paddr, 0x10_0000, "guest must be linked at 1 MiB");
    let image = &elf[offset as usize..(offset + filesz) as usize];

    const SETUP_SECTS: usize = 1;
    let mut out = vec![0u8; (SETUP_SECTS + 1) * 512];
    let put16 =
        |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
    out[0x1f1] = SETUP_SECTS as u8;
    put32(&mut out, 0x1f4, (image.len() as u32).div_ceil(16)); // syssize
    put16(&mut out, 0x1fa, 0xffff); // vid_mode: normal
    put16(&mut out, 0x1fe, 0xaa55); // boot_flag
    out[0x200] = 0xeb; // real-mode entry: jmp 0x268 ...
    out[0x201] = 0x66;
    out[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut out, 0x206, 0x020c); // protocol 2.12
    put16(&mut out, 0x20c, 0x1000); // start_sys_seg
    out[0x211] = 0x01; // loadflags: LOADED_HIGH
    put32(&mut out, 0x214, 0x10_0000); // code32_start
    put32(&mut out, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut out, 0x230, 0x20_0000); // kernel_alignment
    out[0x235] = 21; // min_alignment
    put16(&mut out, 0x236, 0x0001); // xloadflags: XLF_KERNEL_64 (64-bit entry at +0x200)
    put32(&mut out, 0x238, 4095); // cmdline_size
    put32(&mut out, 0x258, 0x10_0000); // pref_address (low half)
    put32(&mut out, 0x260, memsz as u32); // init_size
                                          // ... where real-mode entry is not supported: halt forever.
    out[0x268] = 0xf4; // hlt
    out[0x269] = 0xeb; // jmp hlt
    out[0x26a] = 0xfd;
    out.extend_from_slice(image);
    // syssize counts 16-byte paragraphs: pad the image to a whole number of them.
    out.resize(out.len().next_multiple_of(16), 0);
    out
}
