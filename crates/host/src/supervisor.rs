//! VMM processes: started in their own session (a daemon restart or a signal to the daemon's
//! process group leaves them running), waited for, and their end classified. They are
//! signalled only through a [`Pidfd`], which names one process for good: once it has ended
//! (even reaped and its pid reused) a signal through it fails with ESRCH instead of reaching
//! another process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// A process descriptor (Linux pidfd) for one VMM process.
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// Opens a pidfd for `pid`. For a child not yet waited for, it is that child for sure;
    /// for another process, check what it is *after* opening (the pid may have been reused
    /// before, never after).
    pub fn open(pid: u32) -> std::io::Result<Pidfd> {
        let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(fd).map_err(std::io::Error::other)?;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        Ok(Pidfd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The descriptor, for calls that take a pidfd.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }

    /// Sends `sig` to the process, failing (ESRCH) if it has ended.
    pub fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal on a descriptor we own, with no siginfo and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the process has ended, at most `timeout` (forever with `None`); whether
    /// it has.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX)
                }
            };
            // SAFETY: polling one descriptor we own, with a valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r > 0 {
                return true;
            }
            if r == 0 {
                return false;
            }
        }
    }
}

/// The file in a VM's folder that holds its configuration for `wv run --config`.
pub const CONFIG_FILE: &str = "config.json";

/// Writes `config` to [`CONFIG_FILE`] in `vm_dir`, readable by the owner only (mode 0600):
/// to a temporary file first, renamed over the old one, so a VMM never reads half of one.
/// Returns its path.
pub fn write_config(vm_dir: &Path, config: &wv_config::VmConfig) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = serde_json::to_vec_pretty(config).map_err(std::io::Error::other)?;
    let path = vm_dir.join(CONFIG_FILE);
    let tmp = vm_dir.join(format!("{CONFIG_FILE}.tmp"));
    // A file left by a crash may have another mode: start afresh, as 0600.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The file in a VM's folder where its VMM serves its control API (`wv run --api-socket`).
pub const API_SOCKET: &str = "api.sock";

/// How a VMM starts: booting its configuration, from a snapshot (as a clone: with a new
/// identity), or from a live migration.
pub enum Boot<'a> {
    /// `wv run --config FILE` (see [`write_config`]).
    Config(&'a Path),
    /// `wv run --restore DIR [--clone] [--net-socket I=SOCKET]...`.
    Restore {
        /// The snapshot's folder.
        dir: &'a Path,
        /// A new identity (`--clone`).
        clone: bool,
        /// The switch port of each net on a daemon network, by index (`--net-socket`).
        sockets: &'a [(usize, PathBuf)],
    },
    /// `wv run --incoming ADDR:PORT [--net-socket I=SOCKET]...`: waits there for one
    /// migration (docs/MIGRATION.md); with the directory and the datastore its copied disks
    /// land in (`--copy-disks`), and the switch port of each net on a daemon network.
    Incoming {
        /// Where it listens.
        addr: &'a str,
        /// Where copied disks land.
        copy: Option<(&'a Path, Option<&'a Path>)>,
        /// The switch port of each net on a daemon network, by index (`--net-socket`).
        sockets: &'a [(usize, PathBuf)],
    },
}

/// The `wv run` arguments for a VM in the folder `dir`: its definition from `boot`; the
/// console, which belongs to the VMM process and not to the VM, to `console.log` and
/// `console.sock` there, and its control API on [`API_SOCKET`] there.
pub fn run_args(boot: Boot<'_>, dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into()];
    match boot {
        Boot::Config(f) => a.extend(["--config".into(), f.display().to_string()]),
        Boot::Restore {
            dir,
            clone,
            sockets,
        } => {
            a.extend(["--restore".into(), dir.display().to_string()]);
            if clone {
                a.push("--clone".into());
            }
            for (i, s) in sockets {
                a.extend(["--net-socket".into(), format!("{i}={}", s.display())]);
            }
        }
        Boot::Incoming {
            addr,
            copy,
            sockets,
        } => {
            a.extend(["--incoming".into(), addr.to_string()]);
            for (i, s) in sockets {
                a.extend(["--net-socket".into(), format!("{i}={}", s.display())]);
            }
            if let Some((dir, ds)) = copy {
                a.extend(["--disk-dir".into(), dir.display().to_string()]);
                if let Some(ds) = ds {
                    a.extend(["--datastore".into(), ds.display().to_string()]);
                }
            }
        }
    }
    for (opt, file) in [
        ("--serial", "console.log"),
        ("--console-socket", "console.sock"),
        ("--api-socket", API_SOCKET),
    ] {
        a.extend([opt.into(), dir.join(file).display().to_string()]);
    }
    a
}

/// Starts `wv run` with `args`, console in the arguments, stderr to `log`.
pub fn spawn(wv: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    spawn_in(wv, args, log, None)
}

/// [`spawn`], the process moving itself into the cgroup whose `cgroup.procs` is `procs`
/// before it runs `wv` (so that nothing it starts can begin outside it).
pub fn spawn_in(
    wv: &Path,
    args: &[String],
    log: &Path,
    procs: Option<std::fs::File>,
) -> std::io::Result<Child> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut c = Command::new(wv);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    // Open in the child too (close-on-exec: gone once `wv` runs).
    let procs_fd = procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: setsid and write are async-signal-safe; setsid only detaches the child from our
    // session, and the write of "0" to cgroup.procs moves the child into the world's group.
    unsafe {
        c.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = procs_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = c.spawn();
    drop(procs);
    child
}

/// The process whose threads, descriptors and times are VM `pid`'s: under a jail's keeper
/// (`wv run --jail`, which the daemon records as the VM's pid), the jailed VMM, its only
/// child; otherwise `pid` itself.
pub fn vmm_process(pid: u32) -> u32 {
    let jailed = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--jail"));
    if !jailed {
        return pid;
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut it = children.split_whitespace().filter_map(|c| c.parse().ok());
    match (it.next(), it.next()) {
        (Some(c), None) => c,
        _ => pid,
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses: count after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The last non-empty line of `log` (empty if there is none).
pub fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// How a VMM ended: whether it counts as a crash, and why, in one line.
pub fn classify(status: ExitStatus, stop_requested: bool, log: &Path) -> (bool, String) {
    let last = last_line(log);
    match (status.code(), status.signal()) {
        (Some(c), _) if stop_requested && (c == 143 || c == 130) => {
            (false, "stopped on request".into())
        }
        (Some(c), _) if c <= 199 => (false, format!("guest powered off with exit code {c}")),
        (Some(203), _) => (false, "guest requested a reset".into()),
        (Some(c), _) => (true, format!("VMM failed with status {c}: {last}")),
        // Stopped so soon after its start that the VMM had not yet taken over SIGTERM: the
        // signal's default action ended it, which is still the stop that was asked for.
        (None, Some(s)) if stop_requested && s == libc::SIGTERM => {
            (false, "stopped on request".into())
        }
        (None, Some(s)) if stop_requested && s == libc::SIGKILL => {
            (false, "stopped on request (killed)".into())
        }
        (None, Some(s)) => (true, format!("VMM killed by signal {s}")),
        (None, None) => (true, "VMM ended for an unknown reason".into()),
    }
}

/// What a `wv run --incoming` says on stderr once it listens.
pub const LISTENING: &str = "wv: waiting for a migration on ";

/// The address in the first [`LISTENING`] line of `log` (a VMM's stderr) after byte `from`.
pub fn listening_on(log: &[u8], from: usize) -> Option<String> {
    let text = String::from_utf8_lossy(log.get(from..)?);
    text.lines()
        .find_map(|l| l.strip_prefix(LISTENING))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
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
pub fn wait_foreign(pidfd: &Pidfd) {
    pidfd.wait(None);
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
        assert_eq!(
            classify(ExitStatus::from_raw(libc::SIGTERM), true, &log),
            (false, "stopped on request".into())
        );
        assert!(classify(ExitStatus::from_raw(libc::SIGTERM), false, &log).0);
        std::fs::remove_file(&log).unwrap();
    }

    #[test]
    fn the_listening_line_is_found_after_the_offset() {
        let log = b"wv: waiting for a migration on 1.2.3.4:5\nold\nwv: waiting for a migration on 10.0.0.2:4444\n";
        assert_eq!(listening_on(log, 0).as_deref(), Some("1.2.3.4:5"));
        assert_eq!(listening_on(log, 44).as_deref(), Some("10.0.0.2:4444"));
        assert_eq!(listening_on(log, log.len()), None);
        assert_eq!(listening_on(log, log.len() + 1), None);
        assert_eq!(listening_on(b"wv: waiting for a migration on \n", 0), None);
    }

    #[test]
    fn the_config_file_is_private_and_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wv-sup-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A stale temporary file of another mode, and an old config readable by all.
        std::fs::write(dir.join("config.json.tmp"), b"junk").unwrap();
        std::fs::write(dir.join(CONFIG_FILE), b"old").unwrap();
        std::fs::set_permissions(dir.join(CONFIG_FILE), PermissionsExt::from_mode(0o644)).unwrap();
        let c = wv_config::VmConfig {
            vcpus: 3,
            ..Default::default()
        };
        let p = write_config(&dir, &c).unwrap();
        assert_eq!(p, dir.join(CONFIG_FILE));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back: wv_config::VmConfig =
            serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(!dir.join("config.json.tmp").exists());
        let a = run_args(Boot::Config(&p), &dir);
        assert_eq!(a[..3], ["run", "--config", p.to_str().unwrap()]);
        assert!(a.contains(&dir.join(API_SOCKET).display().to_string()));
        let r = run_args(
            Boot::Restore {
                dir: Path::new("/s"),
                clone: true,
                sockets: &[(1, PathBuf::from("/sw/lan/7-net1.sock"))],
            },
            &dir,
        );
        assert_eq!(
            r[..6],
            [
                "run",
                "--restore",
                "/s",
                "--clone",
                "--net-socket",
                "1=/sw/lan/7-net1.sock"
            ]
        );
        let i = run_args(
            Boot::Incoming {
                addr: "10.0.0.2:0",
                copy: None,
                sockets: &[],
            },
            &dir,
        );
        assert_eq!(i[..3], ["run", "--incoming", "10.0.0.2:0"]);
        assert!(i.contains(&dir.join(API_SOCKET).display().to_string()));
        // What is_our_vmm recognises a VMM of this folder by.
        assert!(a.contains(&dir.join("console.log").display().to_string()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pidfd_never_signals_a_reaped_process() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let fd = Pidfd::open(child.id()).unwrap();
        assert!(!fd.wait(Some(Duration::from_millis(1))), "still running");
        fd.signal(libc::SIGKILL).unwrap();
        assert!(fd.wait(Some(Duration::from_secs(10))), "ended");
        child.wait().unwrap();
        // Reaped: its pid may now belong to anyone; the pidfd refuses.
        let e = fd.signal(libc::SIGKILL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }
}
