//! `wv fs` end to end: a datastore in a file, every command through the CLI (text and
//! `--json`), import and export of raw and qcow2 images through qemu-img, bad usage, and a
//! VMKFS disk served to the probe guest by `wv run --disk vmkfs=…` — including the stale lock
//! a VMM killed with SIGKILL leaves, and breaking it.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ok(args: &[&str]) -> Run {
    let r = wv(args);
    assert_eq!(r.status, Some(0), "wv {args:?}\n{r}");
    r
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let r = ok(&a);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}\n{r}"))
}

fn refused(args: &[&str], status: i32, needle: &str) {
    let r = wv(args);
    assert_eq!(r.status, Some(status), "wv {args:?}\n{r}");
    assert!(
        r.stderr.contains(needle),
        "wv {args:?}: wanted '{needle}'\n{r}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r}");
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img is needed (scripts/test installs Debian's qemu-utils): {e}")
        });
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

#[test]
fn datastore_commands() {
    let dir = TempDir::new("fs");
    let ds = dir.path("ds.img");
    let ds = ds.to_str().unwrap();
    let info = json(&[
        "fs",
        "mkfs",
        ds,
        "--size",
        "256M",
        "--block-size",
        "1M",
        "--label",
        "t",
    ]);
    assert_eq!(info["block_size"], 1 << 20);
    assert_eq!(info["label"], "t");
    refused(&["fs", "mkfs", ds], 1, "--force");
    refused(&["fs", "mkfs", ds, "--size", "1G"], 1, "exists");
    json(&["fs", "create", ds, "web", "--size", "64M"]);
    let thin = json(&["fs", "create", ds, "scratch", "--size", "1G", "--thin"]);
    assert_eq!(
        (thin["kind"].as_str(), thin["allocated"].as_u64()),
        (Some("thin"), Some(0))
    );
    let info = json(&["fs", "info", ds]);
    assert_eq!(info["files"], 2);
    assert_eq!(
        info["free_blocks"].as_u64().unwrap(),
        info["data_blocks"].as_u64().unwrap() - 64,
        "64 preallocated blocks"
    );
    // Text output names everything.
    let r = ok(&["fs", "ls", ds]);
    assert!(
        r.stdout.contains("web") && r.stdout.contains("preallocated"),
        "{r}"
    );
    let snap = json(&["fs", "snapshot", ds, "web"]);
    assert_eq!(snap["parent"], "web@1");
    let ls = json(&["fs", "ls", ds]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web@1", "scratch", "web"]);
    refused(&["fs", "rm", ds, "web@1"], 1, "frozen base");
    json(&["fs", "commit", ds, "web"]);
    json(&["fs", "snapshot", ds, "web"]);
    json(&["fs", "revert", ds, "web"]);
    refused(&["fs", "revert", ds, "web"], 1, "not a redo log");
    let grown = json(&["fs", "resize", ds, "web", "--size", "96M"]);
    assert_eq!(grown["size"], 96 << 20);
    refused(&["fs", "resize", ds, "web", "--size", "1M"], 1, "shrinking");
    refused(
        &["fs", "create", ds, "web", "--size", "1M"],
        1,
        "exists already",
    );
    refused(
        &["fs", "create", ds, "huge", "--size", "10G"],
        1,
        "no space left",
    );
    refused(&["fs", "create", ds, "a/b", "--size", "1M"], 1, "no '/'");
    ok(&["fs", "rm", ds, "scratch"]);
    // (A snapshot and a revert last: their transaction, which the journal keeps and an open
    // replays, does not touch the block map damaged below.)
    json(&["fs", "snapshot", ds, "web"]);
    json(&["fs", "revert", ds, "web"]);
    let check = json(&["fs", "check", ds]);
    assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    // Usage errors: status 200, one line.
    refused(&["fs", "create", ds, "x"], 200, "--size");
    refused(&["fs", "frobnicate", ds], 200, "unknown 'wv fs' command");
    refused(&["fs", "ls"], 200, "takes 1 argument");
    refused(&["fs", "ls", ds, "--colour"], 200, "unknown option");
    refused(
        &["fs", "create", ds, "x", "--size", "lots"],
        200,
        "invalid size",
    );
    // Not a datastore; damage found by check and repaired.
    let junk = dir.file("junk.img", &vec![7u8; 4 << 20]);
    refused(
        &["fs", "ls", junk.to_str().unwrap()],
        1,
        "not a VMKFS datastore",
    );
    refused(&["fs", "ls", "/nonexistent/ds"], 1, "cannot open datastore");
    let mut bytes = std::fs::read(ds).unwrap();
    // Flip a byte in the block map: the last page with its magic and kind 0 (copies of it in
    // the journal come earlier).
    let at = bytes
        .chunks(4096)
        .rposition(|p| &p[..4] == b"VKBM" && p[8..12] == [0; 4])
        .expect("an allocation map page")
        * 4096
        + 100;
    bytes[at] ^= 0xff;
    std::fs::write(ds, &bytes).unwrap();
    let r = wv(&["fs", "check", ds]);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stdout.contains("problem:"), "{r}");
    refused(&["fs", "ls", ds], 1, "check --repair");
    let r = ok(&["fs", "check", ds, "--repair"]);
    assert!(r.stdout.contains("repaired"), "{r}");
    ok(&["fs", "check", ds]);
    assert_eq!(json(&["fs", "ls", ds]).as_array().unwrap().len(), 1);
}

#[test]
fn import_and_export_raw_and_qcow2() {
    let dir = TempDir::new("fs-img");
    let ds = dir.path("ds.img");
    let ds = ds.to_str().unwrap();
    ok(&["fs", "mkfs", ds, "--size", "128M", "--block-size", "64K"]);
    // A raw image with data in a few places and holes elsewhere.
    let mut raw = vec![0u8; 20 << 20];
    raw[..65536].copy_from_slice(&pattern(65536, 1));
    raw[(7 << 20) + 123..(7 << 20) + 123 + 300_000].copy_from_slice(&pattern(300_000, 2));
    raw[(20 << 20) - 512..].copy_from_slice(&pattern(512, 3));
    let src = dir.file("src.raw", &raw);
    let q = dir.path("src.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let r = ok(&["fs", "import", ds, "fromraw", src.to_str().unwrap()]);
    assert!(
        r.stderr.contains("importing fromraw: 100%"),
        "progress is shown: {r}"
    );
    let thin = json(&[
        "fs",
        "import",
        ds,
        "fromqcow",
        q.to_str().unwrap(),
        "--thin",
    ]);
    assert_eq!(thin["size"], 20 << 20);
    // Only the blocks with data were allocated: 1 + 6 (300 KB across 64 KiB blocks) + 1.
    let allocated = thin["allocated"].as_u64().unwrap();
    assert!(allocated <= 8 * 65536, "{thin}");
    for name in ["fromraw", "fromqcow"] {
        let out = dir.path(&format!("{name}.out"));
        ok(&["fs", "export", ds, name, out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == raw, "{name} round trip");
    }
    // qemu-img agrees the export is the same disk as the qcow2 source.
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        dir.path("fromqcow.out").to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    refused(
        &["fs", "import", ds, "x", "/nonexistent.qcow2"],
        1,
        "nonexistent",
    );
    let garbage = dir.file("garbage.qcow2", b"QFI\xfbnot really");
    let r = wv(&["fs", "import", ds, "bad", garbage.to_str().unwrap()]);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(
        json(&["fs", "ls", ds])
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["name"] != "bad"),
        "no half-imported disk"
    );
    refused(
        &[
            "fs",
            "export",
            ds,
            "fromraw",
            dir.path("fromraw.out").to_str().unwrap(),
        ],
        1,
        "cannot create",
    );
    ok(&["fs", "check", ds]);
}

/// A datastore holding disk `root` with the probe guest's disk magic.
fn guest_datastore(dir: &TempDir) -> String {
    let ds = dir.path("ds.img").to_str().unwrap().to_string();
    ok(&["fs", "mkfs", &ds, "--size", "64M", "--block-size", "64K"]);
    let mut d = vec![0u8; 1 << 20];
    d[..8].copy_from_slice(b"WVDISK01");
    let src = dir.file("root.raw", &d);
    ok(&["fs", "import", &ds, "root", src.to_str().unwrap()]);
    ds
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_guest_uses_a_vmkfs_disk() {
    need_kvm();
    let dir = TempDir::new("fs-guest");
    let ds = guest_datastore(&dir);
    let spec = format!("vmkfs={ds}:root,id=root");
    // Each run writes a pattern unique to it (probe.blkseed) into sector 1 of its disk.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let seed_a = (u64::from(nanos) | 1) ^ (u64::from(std::process::id()) << 32);
    let seed_b = seed_a ^ 0x5a5a_5a5a_5a5a_5a5a;
    let sector1 = |seed: u64| -> Vec<u8> {
        (0..512)
            .map(|i: usize| i.to_le_bytes()[0] ^ 0xa5 ^ 1 ^ seed.to_le_bytes()[i % 8])
            .collect()
    };
    let run_blk = |seed: u64| {
        let cmdline = format!("probe.tests=blk probe.blkseed={seed}");
        let r = ok(&["run", "--disk", &spec, "--cmdline", &cmdline]);
        let line = r.assert_pass("blk").to_string();
        assert!(line.contains("root:sectors=2048,magic,rw-ok"), "{line}");
    };
    let export = |name: &str, to: &str| -> Vec<u8> {
        let out = dir.path(to);
        ok(&["fs", "export", &ds, name, out.to_str().unwrap()]);
        std::fs::read(&out).unwrap()
    };
    run_blk(seed_a);
    assert!(
        export("root", "a.raw")[512..1024] == sector1(seed_a)[..],
        "the guest's write of sector 1 is in the VMKFS disk"
    );
    // On a snapshot, the guest writes into the redo log and the base keeps the old sector.
    ok(&["fs", "snapshot", &ds, "root"]);
    run_blk(seed_b);
    let files = json(&["fs", "ls", &ds]);
    let names: Vec<&str> = files
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{files}");
    let base = *names.iter().find(|n| n.starts_with("root@")).unwrap();
    assert!(
        export("root", "b.raw")[512..1024] == sector1(seed_b)[..],
        "the disk as the guest sees it has the second run's sector"
    );
    let frozen = export(base, "base.raw");
    assert!(
        frozen[512..1024] == sector1(seed_a)[..],
        "the frozen base {base} keeps the first run's sector"
    );
    assert_eq!(&frozen[..8], b"WVDISK01");
    // A missing disk or datastore is an image error (202), one line.
    refused(
        &[
            "run",
            "--disk",
            &format!("vmkfs={ds}:nope"),
            "--cmdline",
            "probe.tests=boot",
        ],
        202,
        "no file named 'nope'",
    );
    refused(
        &[
            "run",
            "--disk",
            "vmkfs=/nonexistent:x",
            "--cmdline",
            "probe.tests=boot",
        ],
        202,
        "/nonexistent",
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_killed_vmm_leaves_a_stale_lock_that_can_be_broken() {
    need_kvm();
    let dir = TempDir::new("fs-lock");
    let ds = guest_datastore(&dir);
    let spec = format!("vmkfs={ds}:root,id=root");
    let mut vmm = Command::new(wv_bin())
        .args([
            "run",
            "--disk",
            &spec,
            "--serial",
            "none",
            "--cmdline",
            "probe.tests=hang",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = vmm.id();
    let t = Instant::now();
    loop {
        let ls = json(&["fs", "ls", &ds]);
        if ls[0]["owner"].is_string() {
            assert!(
                ls[0]["owner"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("pid {pid}")),
                "{ls}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the VMM never opened its disk"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // While it runs: a second VMM, rm and unlock are refused, naming the holder.
    let holder = format!("pid {pid}");
    refused(
        &["run", "--disk", &spec, "--cmdline", "probe.tests=boot"],
        202,
        &holder,
    );
    refused(&["fs", "rm", &ds, "root"], 1, &holder);
    refused(&["fs", "unlock", &ds, "root"], 1, &holder);
    // Nor does it open read-only while a writer has it.
    refused(
        &[
            "run",
            "--disk",
            &format!("{spec},readonly=on"),
            "--cmdline",
            "probe.tests=boot",
        ],
        202,
        &holder,
    );
    // SAFETY: killing the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = vmm.wait();
    // Its record stays: detected as stale, and refused until broken explicitly.
    refused(
        &["run", "--disk", &spec, "--cmdline", "probe.tests=boot"],
        202,
        "wv fs unlock",
    );
    let r = ok(&["fs", "check", &ds]);
    assert!(r.stdout.contains("stale lock"), "{r}");
    ok(&["fs", "unlock", &ds, "root"]);
    let r = ok(&["run", "--disk", &spec, "--cmdline", "probe.tests=blk"]);
    r.assert_pass("blk");
    assert!(
        json(&["fs", "ls", &ds])[0]["owner"].is_null(),
        "a clean exit clears the record"
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn daemon_vms_share_a_vmkfs_disk_one_at_a_time() {
    need_kvm();
    let dir = TempDir::new("fs-host");
    let ds = guest_datastore(&dir);
    let d = common::daemon::Daemon::start(&dir);
    let disk = format!("vmkfs={ds}:root,id=root");
    for (name, tests) in [
        ("holder", "probe.tests=hang"),
        ("second", "probe.tests=blk"),
    ] {
        let r = d.wv(&["vm", "create", name, "--disk", &disk, "--cmdline", tests]);
        assert_eq!(r.status, Some(0), "{r}");
    }
    let holder = d.json(&["vm", "start", "holder"]);
    let pid = holder["pid"].as_u64().unwrap();
    let t = Instant::now();
    while json(&["fs", "ls", &ds])[0]["owner"].is_null() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the VMM never opened its disk"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.json(&["vm", "start", "second"]);
    let second = d.wait_state("second", "crashed");
    let reason = second["reason"].as_str().unwrap();
    assert!(
        reason.contains("status 202") && reason.contains(&format!("pid {pid}")),
        "{second}"
    );
    // A stop through the daemon (SIGTERM) closes the disk cleanly: no stale lock.
    d.json(&["vm", "stop", "holder"]);
    assert!(json(&["fs", "ls", &ds])[0]["owner"].is_null());
    d.json(&["vm", "start", "second"]);
    let second = d.wait_state("second", "stopped");
    assert_eq!(
        second["reason"], "guest powered off with exit code 0",
        "{second}"
    );
    d.stop();
}

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn new(file: &std::path::Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            out.status.success(),
            "this test needs a loop device (root and the loop driver): {out:?}"
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_datastore_on_a_block_device() {
    need_kvm();
    let dir = TempDir::new("fs-loop");
    let backing = dir.path("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = Loop::new(&backing);
    let info = json(&["fs", "mkfs", &dev.0, "--block-size", "64K"]);
    assert_eq!(info["size"], 64 << 20, "the size of the block device");
    let mut d = vec![0u8; 1 << 20];
    d[..8].copy_from_slice(b"WVDISK01");
    let src = dir.file("root.raw", &d);
    ok(&["fs", "import", &dev.0, "root", src.to_str().unwrap()]);
    let r = ok(&[
        "run",
        "--disk",
        &format!("vmkfs={}:root,id=root", dev.0),
        "--cmdline",
        "probe.tests=blk",
    ]);
    r.assert_pass("blk");
    let out = dir.path("out.raw");
    ok(&["fs", "export", &dev.0, "root", out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    assert!((0..512).all(|i| data[512 + i] == i.to_le_bytes()[0] ^ 0xa5 ^ 1));
    ok(&["fs", "check", &dev.0]);
}
