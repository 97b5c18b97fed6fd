//! Disks go with the VM (issue 11): a VMKFS disk freezes at the snapshot instant, the source
//! runs on in a new redo log, each restore gets a branch of its own on the frozen file; a raw
//! disk open for writing by a running VMM keeps a restore out; a VMM killed between the freeze
//! and the snapshot's write leaves a consistent datastore.
//!
//! The probe guest waits in its `echo` test (for serial input) while the snapshot is taken,
//! then, given `q`, runs `blk`, which writes a pattern to sector 1 of its disk.

mod common;

use common::vmm::{call, Vmm};
use common::{need_kvm, wv, wv_bin, TempDir};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// One guest at a time: they share two CPUs with everything else.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn snapshot(sock: &Path, dir: &Path, allow_raw_disk: bool) -> (u16, serde_json::Value) {
    let mut b = serde_json::json!({ "destination": dir });
    if allow_raw_disk {
        b["allow_raw_disk"] = true.into();
    }
    call(sock, "PUT", "/vm/snapshot", Some(&b))
}

/// A `wv run` with its serial console on stdin and stdout.
fn start(args: &[&str]) -> Vmm {
    let mut c = Command::new(wv_bin());
    c.arg("run").args(args);
    spawn(c)
}

fn spawn(cmd: Command) -> Vmm {
    Vmm::command(cmd)
        .stdin()
        .timeout(Duration::from_secs(90))
        .spawn()
}

fn fs_ok(args: &[&str]) -> String {
    let mut a = vec!["fs"];
    a.extend_from_slice(args);
    let r = wv(&a);
    assert_eq!(r.status, Some(0), "wv {a:?}: {r}");
    r.stdout
}

/// Sector 1 (bytes 512..1024) of disk `name`, exported.
fn sector1(dir: &TempDir, ds: &str, name: &str) -> Vec<u8> {
    let out = dir.path(&format!("export-{name}"));
    let _ = std::fs::remove_file(&out);
    fs_ok(&["export", ds, name, out.to_str().unwrap()]);
    std::fs::read(&out).unwrap()[512..1024].to_vec()
}

/// What the probe's `blk` test writes to sector 1 of its first disk with `probe.blkseed=seed`.
fn blk_pattern(seed: u64) -> Vec<u8> {
    let s = seed.to_le_bytes();
    (0..512usize)
        .map(|i| i.to_le_bytes()[0] ^ 0xa5 ^ 1 ^ s[i % 8])
        .collect()
}

fn files(ds: &str) -> serde_json::Value {
    serde_json::from_str(&fs_ok(&["ls", ds, "--json"])).unwrap()
}

fn file<'a>(ls: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    ls.as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no file '{name}' in {ls:#}"))
}

/// A datastore with disk `d` holding `content` (sector 0 has the probe's magic).
fn datastore(dir: &TempDir) -> (String, Vec<u8>) {
    let ds = dir.path("ds.img").to_str().unwrap().to_string();
    fs_ok(&["mkfs", &ds, "--size", "64M", "--block-size", "64K"]);
    let mut content = common::pattern(1 << 20, 7);
    content[..8].copy_from_slice(b"WVDISK01");
    let raw = dir.file("content.img", &content);
    fs_ok(&["import", &ds, "d", raw.to_str().unwrap()]);
    (ds, content)
}

fn check_consistent(ds: &str) -> String {
    let r = wv(&["fs", "check", ds]);
    assert_eq!(r.status, Some(0), "the datastore is inconsistent: {r}");
    r.stdout
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_vmkfs_disk_freezes_with_the_snapshot_and_each_restore_gets_its_own_branch() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmkfs-snap");
    let (ds, content) = datastore(&dir);
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    let mut src = start(&[
        "--disk",
        &format!("vmkfs={ds}:d,id=root"),
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=echo,blk probe.blkseed=1",
    ]);
    src.wait_for("echo: type");
    let (st, r) = snapshot(&sock, &snap, false);
    assert_eq!(st, 200, "a VMKFS disk goes with the snapshot: {r}");
    assert_eq!(r["disks"][0]["frozen"], "d@1", "{r}");
    assert_eq!(r["disks"][0]["name"], "d", "{r}");
    let ls = files(&ds);
    assert_eq!(file(&ls, "d@1")["frozen"], true, "{ls:#}");
    assert_eq!(file(&ls, "d")["kind"], "redo-log", "{ls:#}");
    let pid = src.child.id().to_string();
    assert!(
        file(&ls, "d")["owner"].as_str().unwrap().contains(&pid),
        "the source VMM still owns its disk, now the redo log: {ls:#}"
    );

    // A restore while the source still runs: its own branch of the frozen disk.
    let sock2 = dir.path("api2.sock");
    let mut back = start(&[
        "--restore",
        snap.to_str().unwrap(),
        "--api-socket",
        sock2.to_str().unwrap(),
    ]);
    // The restored guest is still in its echo test: what it is sent comes back.
    back.type_in("hello\n");
    back.wait_for("hello");
    let ls = files(&ds);
    let b1 = file(&ls, "d@1+r1");
    assert_eq!(b1["parent"], "d@1", "{ls:#}");
    assert!(
        b1["owner"]
            .as_str()
            .unwrap()
            .contains(&back.child.id().to_string()),
        "the restored VMM owns its branch: {ls:#}"
    );

    // The source writes after the snapshot; its disk has the write, the frozen file does not.
    src.type_in("q");
    let blk = src.wait_for("PASS blk");
    assert!(blk.contains("root:sectors=2048,magic,rw-ok"), "{blk}");
    src.wait_for("probe: summary passed=2 failed=0");
    assert_eq!(src.wait(), 0);
    assert_eq!(
        sector1(&dir, &ds, "d"),
        blk_pattern(1),
        "the source's write"
    );
    assert_eq!(sector1(&dir, &ds, "d@1"), content[512..1024].to_vec());

    // The restored VM ends without writing: its branch is the disk of the snapshot instant.
    assert_eq!(call(&sock2, "PUT", "/vm/shutdown", None).0, 204);
    assert_eq!(back.wait(), 128 + libc::SIGTERM);
    assert_eq!(
        sector1(&dir, &ds, "d@1+r1"),
        content[512..1024].to_vec(),
        "the restored disk has the snapshot-time contents, not the source's later write"
    );
    assert!(files(&ds)
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["owner"].is_null()));

    // A second restore of the same snapshot: a second branch, where its guest now writes
    // (another seed would not do: the guest's memory, command line included, is the
    // snapshot's), leaving the first branch and the frozen file alone.
    let mut again = start(&["--restore", snap.to_str().unwrap()]);
    again.type_in("q");
    let blk = again.wait_for("PASS blk");
    assert!(blk.contains("root:sectors=2048,magic,rw-ok"), "{blk}");
    again.wait_for("probe: summary passed=2 failed=0");
    assert_eq!(again.wait(), 0);
    assert_eq!(sector1(&dir, &ds, "d@1+r2"), blk_pattern(1));
    assert_eq!(sector1(&dir, &ds, "d@1+r1"), content[512..1024].to_vec());
    assert_eq!(sector1(&dir, &ds, "d@1"), content[512..1024].to_vec());
    let ls = files(&ds);
    assert_eq!(
        ls.as_array().unwrap().len(),
        4,
        "d@1, d, d@1+r1, d@1+r2: {ls:#}"
    );
    check_consistent(&ds);
    // The rest of the disk is the snapshot's everywhere.
    let out = dir.path("whole");
    fs_ok(&["export", &ds, "d@1+r1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == content, "d@1+r1 differs");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_vmm_killed_between_the_freeze_and_the_snapshot_leaves_a_consistent_datastore() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmkfs-snapkill");
    let (ds, content) = datastore(&dir);
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    // The VMM stops after freezing until this pipe ends (debug builds only).
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (hold_r, hold_w) = (fds[0], fds[1]);
    const HOLD: i32 = 100;
    let mut cmd = Command::new(wv_bin());
    cmd.args([
        "run",
        "--disk",
        &format!("vmkfs={ds}:d,id=root"),
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=echo",
    ])
    .env("WV_TEST_SNAPSHOT_HOLD_FD", HOLD.to_string())
    .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it gives the child the pipe's read end as fd 100.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(hold_r, HOLD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vm = spawn(cmd);
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(hold_r) };
    let stderr = vm.child.stderr.take().unwrap();
    let (tx, frozen) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr).lines() {
            let Ok(l) = l else { break };
            if l.contains("wv-test: disks frozen") {
                let _ = tx.send(());
            }
        }
    });
    vm.wait_for("echo: type");
    let s = sock.clone();
    let sn = snap.clone();
    // Answered only if the VMM lives on, which it does not.
    std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| snapshot(&s, &sn, false));
    });
    frozen
        .recv_timeout(Duration::from_secs(60))
        .expect("the VMM froze its disk");
    let pid = i32::try_from(vm.child.id()).unwrap();
    // SAFETY: SIGKILL to the child we started (not yet waited for, so the pid is still its).
    let killed = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(killed, 0);
    let st = vm.child.wait().unwrap();
    assert_eq!(st.code(), None, "killed");
    // SAFETY: our write end, no longer needed.
    unsafe { libc::close(hold_w) };
    assert!(
        !snap.join("state").exists(),
        "no snapshot was written: {:?}",
        std::fs::read_dir(&snap).map(|d| d.count())
    );
    let out = check_consistent(&ds);
    assert!(
        out.contains("stale lock"),
        "the dead VMM's record is noted: {out}"
    );
    let ls = files(&ds);
    assert_eq!(file(&ls, "d@1")["frozen"], true, "{ls:#}");
    assert_eq!(file(&ls, "d")["kind"], "redo-log", "{ls:#}");
    // Breaking the stale lock gives the disk back, with everything the guest had.
    fs_ok(&["unlock", &ds, "d"]);
    let whole = dir.path("whole");
    fs_ok(&["export", &ds, "d", whole.to_str().unwrap()]);
    assert!(std::fs::read(&whole).unwrap() == content);
    check_consistent(&ds);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_raw_disk_is_refused_unless_allowed_and_keeps_a_second_writer_out_of_a_restore() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmkfs-snapraw");
    let mut img = vec![0u8; 1 << 20];
    img[..8].copy_from_slice(b"WVDISK01");
    let raw = dir.file("raw.img", &img);
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    let mut src = start(&[
        "--disk",
        &format!("path={},id=root", raw.display()),
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=echo",
    ]);
    src.wait_for("echo: type");
    let (st, r) = snapshot(&sock, &snap, false);
    assert_eq!(st, 422, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("allow_raw_disk"),
        "{r}"
    );
    let (st, r) = snapshot(&sock, &snap, true);
    assert_eq!(st, 200, "{r}");
    assert!(r["disks"].as_array().unwrap().is_empty(), "{r}");
    // A second process restoring it would share the writable image: the lock refuses it, and
    // nothing runs.
    let r = wv(&["run", "--restore", snap.to_str().unwrap()]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(
        r.stderr.contains("lock") || r.stderr.contains("in use"),
        "the disk lock says why: {r}"
    );
    assert!(r.stdout.is_empty(), "the guest ran: {r}");
    // The source runs on.
    src.type_in("abc\n");
    src.wait_for("abc");
    assert_eq!(call(&sock, "PUT", "/vm/shutdown", None).0, 204);
    assert_eq!(src.wait(), 128 + libc::SIGTERM);
}
