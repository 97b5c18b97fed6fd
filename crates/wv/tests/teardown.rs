//! `wv run` exits at once and leaves the kernel's slow destruction of the VM to a helper
//! process; that helper must not hold `wv`'s output, or whoever reads it to the end waits for
//! the teardown. Own test binary: it makes itself a child subreaper to find the helper.

mod common;
use common::*;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The pids of the live processes whose parent is this process.
fn children() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                let rest = &st[st.rfind(')').unwrap_or(0) + 1..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.len() > 1 && f[0] != "Z" && f[1] == me.to_string()
            })
        })
        .collect()
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn output_and_disks_are_free_when_wv_exits_not_when_the_vm_is_destroyed() {
    need_kvm();
    // SAFETY: prctl with integer arguments; orphans of this test process become its children.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    // The helper reads this pipe to its end before exiting: the test holds it mid-teardown.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (hold_r, hold_w) = (fds[0], fds[1]);
    const HOLD: i32 = 100;
    let mut cmd = Command::new(wv_bin());
    cmd.args(["run", "--cmdline", "probe.tests=boot"])
        .env("WV_TEARDOWN_HOLD_FD", HOLD.to_string())
        .stdout(Stdio::piped())
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
    let mut child = cmd.spawn().unwrap();
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(hold_r) };
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut out, mut err) = (String::new(), String::new());
        let _ = stdout.read_to_string(&mut out);
        let _ = stderr.read_to_string(&mut err);
        let _ = tx.send((out, err));
    });
    // End-of-file on both while the helper is held, i.e. before the VM is destroyed.
    let got = rx.recv_timeout(Duration::from_secs(60));
    let status = child.wait().unwrap();
    let helpers = children();
    let open: Vec<Vec<i32>> = helpers
        .iter()
        .map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    // SAFETY: closing the write end releases the helper.
    unsafe { libc::close(hold_w) };
    let (out, err) = got.expect("wv's output did not end while its teardown helper ran");
    assert_eq!(status.code(), Some(0), "{out}{err}");
    assert!(out.contains("PASS boot"), "{out}");
    // The helper was alive then (it outlives wv) and held none of the standard descriptors.
    assert_eq!(helpers.len(), 1, "one teardown helper: {helpers:?}");
    assert!(
        open[0].iter().all(|&fd| fd > 2),
        "the helper keeps no standard descriptor: {open:?}"
    );
    // It ends once released.
    let mut st = 0;
    // SAFETY: waiting for our (adopted) child.
    let r = unsafe { libc::waitpid(helpers[0] as i32, &mut st, 0) };
    assert_eq!(r, helpers[0] as i32);
    a_disk_is_free_for_the_next_vmm_once_wv_has_exited();
}

/// Part of the test above (one test function: the subreaper would adopt the helpers of a
/// test running beside it).
fn a_disk_is_free_for_the_next_vmm_once_wv_has_exited() {
    let dir = TempDir::new("teardown-disk");
    let mut disk = vec![0u8; 1 << 20];
    disk[..8].copy_from_slice(b"WVDISK01");
    let img = dir.file("d.img", &disk);
    let spec = format!("path={}", img.display());
    // The first VMM's helper is held mid-teardown while the second one opens the disk.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (hold_r, hold_w) = (fds[0], fds[1]);
    let mut first = Command::new(wv_bin());
    first
        .args(["run", "--disk", &spec, "--cmdline", "probe.tests=blk"])
        .env("WV_TEARDOWN_HOLD_FD", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it gives the child the pipe's read end as fd 100.
    unsafe {
        first.pre_exec(move || {
            if libc::dup2(hold_r, 100) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = first.status().unwrap();
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(hold_r) };
    assert_eq!(status.code(), Some(0));
    let second = wv(&["run", "--disk", &spec, "--cmdline", "probe.tests=blk"]);
    // SAFETY: closing the write end releases the first helper.
    unsafe { libc::close(hold_w) };
    assert_eq!(second.status, Some(0), "{second}");
    second.assert_pass("blk");
}
