//! VMM processes: started in their own session (a daemon restart or a signal to the daemon's
//! process group leaves them running), waited for, and their end classified.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

/// Starts `wv run` with `args`, console in the arguments, stderr to `log`.
pub fn spawn(wv: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut c = Command::new(wv);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    // SAFETY: setsid is async-signal-safe and only detaches the child from our session.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    c.spawn()
}

/// How a VMM ended: whether it counts as a crash, and why, in one line.
pub fn classify(status: ExitStatus, stop_requested: bool, log: &Path) -> (bool, String) {
    let last = std::fs::read_to_string(log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default();
    match (status.code(), status.signal()) {
        (Some(c), _) if stop_requested && (c == 143 || c == 130) => {
            (false, "stopped on request".into())
        }
        (Some(c), _) if c <= 199 => (false, format!("guest powered off with exit code {c}")),
        (Some(203), _) => (false, "guest requested a reset".into()),
        (Some(c), _) => (true, format!("VMM failed with status {c}: {last}")),
        (None, Some(s)) if stop_requested && s == libc::SIGKILL => {
            (false, "stopped on request (killed)".into())
        }
        (None, Some(s)) => (true, format!("VMM killed by signal {s}")),
        (None, None) => (true, "VMM ended for an unknown reason".into()),
    }
}

/// Whether `pid` is alive and a `wv run` whose console is under `vm_dir`.
pub fn is_our_vmm(pid: u32, vm_dir: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
    let console = vm_dir.join("console.log");
    args.get(1) == Some(&&b"run"[..])
        && args
            .iter()
            .any(|a| *a == console.to_string_lossy().as_bytes())
}

/// Waits for a process that is not our child (re-adopted after a restart) to end.
pub fn wait_foreign(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return;
    }
    let Ok(fd) = libc::c_int::try_from(fd) else {
        return;
    };
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one descriptor we own, then closing it.
    unsafe {
        while libc::poll(&mut p, 1, -1) < 0 {}
        libc::close(fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings() {
        let log = std::env::temp_dir().join(format!("wv-sup-{}", std::process::id()));
        std::fs::write(&log, "wv: error: disk /x is in use\n\n").unwrap();
        let st = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(
            classify(st(0), false, &log),
            (false, "guest powered off with exit code 0".into())
        );
        assert_eq!(
            classify(st(143), true, &log),
            (false, "stopped on request".into())
        );
        assert!(classify(st(202), false, &log).0);
        assert!(classify(st(202), false, &log)
            .1
            .contains("disk /x is in use"));
        assert_eq!(
            classify(ExitStatus::from_raw(9), false, &log),
            (true, "VMM killed by signal 9".into())
        );
        assert!(!classify(ExitStatus::from_raw(9), true, &log).0);
        std::fs::remove_file(&log).unwrap();
    }
}
