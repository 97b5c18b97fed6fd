//! The jail of `wv run --jail` (and of every VMM the daemon starts): before anything else runs,
//! while still root, the VMM opens everything its configuration names and leaves it in the
//! table of handed-over files (crates/fds); then it enters new mount, PID, IPC and (unless
//! `net=host`) network namespaces, makes a root that holds only `/dev/{null,zero,random,
//! urandom}`, a fresh `/proc` and the one host folder it is given (at its own path), and
//! becomes an unprivileged user with no capabilities, `no_new_privs` and resource limits.
//!
//! A new PID namespace takes a fork: the process the caller started stays as the jail's
//! keeper (pid as before, the same command line), passes on the stop signals and ends as the
//! VMM does (its status, or its signal); the VMM is the namespace's first process, and is
//! killed if the keeper dies (PR_SET_PDEATHSIG).
use crate::error::VmmError;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use wv_config::{DiskConfig, JailConfig, JailNet, SerialMode, VmConfig};

/// The key of the userfaultfd an incoming VM's post-copy takes (made in the jail while still
/// root: unprivileged users may not make one that sees KVM's faults).
pub const USERFAULTFD: &str = "userfaultfd";

/// Opens of one VMKFS datastore handed over per disk it holds (each an open file description
/// of its own, as the datastore's locks need; a disk and its branch take a few).
const OPENS_PER_VMKFS_DISK: usize = 4;

/// The key of a migration's connection to `addr` handed over by the daemon.
pub fn tcp_key(addr: &std::net::SocketAddr) -> String {
    format!("tcp:{addr}")
}

/// The key of a Unix socket bound at `path` before the jail.
fn listen_key(path: &Path) -> String {
    format!("listen:{}", path.display())
}

/// The listener bound at `path` before the jail, if any.
pub(crate) fn take_listener(path: &Path) -> Option<UnixListener> {
    wv_fds::take(&listen_key(path)).map(UnixListener::from)
}

/// Opens the serial console's output file (appending, created if absent).
pub(crate) fn open_serial(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn config_err(m: String) -> VmmError {
    VmmError::Config(crate::config::ConfigError(m))
}

fn put(key: &str, fd: OwnedFd) -> Result<(), VmmError> {
    wv_fds::put(key, fd)
        .map(drop)
        .map_err(|e| VmmError::Internal(format!("--jail: {e}")))
}

/// Opens `path` (read-write if `write`) and hands it over; a file that cannot be opened is
/// left for the jailed VMM to fail on, with the error (and exit status) it gives for it.
fn hand_file(path: &Path, write: bool) -> Result<(), VmmError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
    {
        Ok(f) => put(&path.display().to_string(), f.into()),
        Err(_) => Ok(()),
    }
}

/// Connects to the vhost-user backend at `path` and hands the connection over (as
/// [`hand_file`], a failure is the jailed VMM's to report).
fn hand_connection(path: &Path) -> Result<(), VmmError> {
    match UnixStream::connect(path) {
        Ok(s) => put(&path.display().to_string(), s.into()),
        Err(_) => Ok(()),
    }
}

/// Opens, as the caller (root), everything the VMM process needs besides its VM's files: the
/// KVM device, the serial output and the console's and control API's sockets of `cfg`.
pub fn preopen_process(cfg: &VmConfig) -> Result<(), VmmError> {
    let kvm = std::env::var("WV_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string());
    hand_file(Path::new(&kvm), true)?;
    if let SerialMode::File(p) = &cfg.serial {
        let f = open_serial(p)
            .map_err(|e| config_err(format!("cannot open serial output {}: {e}", p.display())))?;
        put(&p.display().to_string(), f.into())?;
    }
    if let Some(p) = &cfg.console_socket {
        put(&listen_key(p), crate::console_listener(p)?.into())?;
    }
    if let Some(p) = &cfg.api_socket {
        put(
            &listen_key(p),
            crate::control::listen(p).map_err(config_err)?.into(),
        )?;
    }
    Ok(())
}

/// Opens, as the caller (root), every file, TAP and socket the VM of `cfg` is made of, and
/// leaves them in the handed-over table for the VMM to take once jailed.
pub fn preopen_vm(cfg: &VmConfig) -> Result<(), VmmError> {
    if let wv_config::KernelSource::Path(p) = &cfg.kernel {
        hand_file(p, false)?;
    }
    if let Some(p) = &cfg.initrd {
        hand_file(p, false)?;
    }
    preopen_disks(&cfg.disks)?;
    for n in &cfg.nets {
        if let Some(s) = &n.vhost_user {
            hand_connection(s)?;
        } else if !n.tap.is_empty() {
            let tap = wv_virtio::net::Tap::open(&n.tap).map_err(VmmError::Net)?;
            put(&wv_virtio::net::tap_key(&n.tap), tap.into_file().into())?;
        }
    }
    Ok(())
}

/// The disks' files: raw images, VMKFS datastores (several opens each) and backends' sockets.
fn preopen_disks(disks: &[DiskConfig]) -> Result<(), VmmError> {
    let mut datastores: Vec<(&PathBuf, usize)> = Vec::new();
    for d in disks {
        if d.vhost_user {
            hand_connection(&d.path)?;
        } else if d.vmkfs.is_some() {
            match datastores.iter_mut().find(|(p, _)| *p == &d.path) {
                Some((_, n)) => *n += 1,
                None => datastores.push((&d.path, 1)),
            }
        } else {
            hand_file(&d.path, !d.readonly)?;
        }
    }
    for (p, disks) in datastores {
        preopen_datastore(p, disks)?;
    }
    Ok(())
}

/// Hands over `disks` disks' worth of opens of the VMKFS datastore at `path` (a migration's
/// copies land in one too).
pub fn preopen_datastore(path: &Path, disks: usize) -> Result<(), VmmError> {
    for _ in 0..=disks * OPENS_PER_VMKFS_DISK {
        hand_file(path, true)?;
    }
    Ok(())
}

fn os_err(what: &str) -> VmmError {
    VmmError::Internal(format!(
        "--jail: {what}: {}",
        std::io::Error::last_os_error()
    ))
}

fn cstr(p: &Path) -> Result<CString, VmmError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| config_err(format!("--jail: {} holds a NUL byte", p.display())))
}

/// mount(2) with the error named.
fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), VmmError> {
    let (s, t, f, d) = (
        CString::new(src).unwrap_or_default(),
        cstr(target)?,
        CString::new(fstype).unwrap_or_default(),
        CString::new(data).unwrap_or_default(),
    );
    let nul = |c: &CString| {
        if c.as_bytes().is_empty() {
            std::ptr::null()
        } else {
            c.as_ptr()
        }
    };
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null.
    if unsafe { libc::mount(nul(&s), t.as_ptr(), nul(&f), flags, nul(&d).cast()) } != 0 {
        return Err(os_err(&format!("mounting {src} on {}", target.display())));
    }
    Ok(())
}

/// Where the jail's root is built: a fresh tmpfs mounted over this folder in the jail's own
/// mount namespace (the host's folder is untouched).
const BUILD_AT: &str = "/tmp";

/// Enters the jail `j` for the VM `vm` (None: not known yet, no address-space limit): returns in the jailed VMM; the process that called it never returns from here (it
/// keeps the jail and ends as the VMM does). `incoming`: make a userfaultfd while root, for a
/// post-copy migration.
pub fn enter(j: &JailConfig, vm: Option<&VmConfig>, incoming: bool) -> Result<(), VmmError> {
    // Guest RAM is mapped twice while a shared-memory VM is restored or received (the file or
    // anonymous copy, and its memfd).
    let memory = vm.map(|c| {
        if c.memory_is_shared() {
            c.memory.saturating_mul(2)
        } else {
            c.memory
        }
    });
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(config_err(
            "--jail needs root: it opens the VM's files, then gives up root".into(),
        ));
    }
    if let Some(d) = &j.dir {
        if !d.is_dir() {
            return Err(config_err(format!(
                "--jail dir={}: not a folder",
                d.display()
            )));
        }
    }
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC;
    if j.net == JailNet::New {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags only; the process is single-threaded here (no thread has
    // been started: the caller's contract).
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(os_err("unshare"));
    }
    let stop = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGCONT,
        libc::SIGQUIT,
    ];
    // SAFETY: signal sets on the stack, initialised by sigemptyset before use.
    let (set, old) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in stop.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        (set, old)
    };
    // SAFETY: getpid has no preconditions.
    let keeper_pid = unsafe { libc::getpid() };
    // The keeper, as a pidfd: the VMM cannot name it by pid from inside its namespace.
    // SAFETY: pidfd_open of this process; the result is checked.
    let keeper = unsafe { libc::syscall(libc::SYS_pidfd_open, keeper_pid, 0) };
    let keeper = i32::try_from(keeper).map_err(|_| os_err("pidfd_open"))?;
    if keeper < 0 {
        return Err(os_err("pidfd_open"));
    }
    // The VMM's exit status reaches the keeper on this pipe ahead of the VMM's end, which a
    // PID namespace's first process reports only after every process in it has gone (the
    // teardown helper finishing KVM's slow teardown, 10-30 ms): [`report_exit`].
    let mut status_pipe = [-1i32; 2];
    // SAFETY: pipe2 fills two descriptors; the result is checked.
    if unsafe { libc::pipe2(status_pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe2"));
    }
    // SAFETY: fork in a single-threaded process; the child only continues this function.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os_err("fork"));
    }
    if child > 0 {
        keep(child, &set, &stop, status_pipe[0]);
    }
    // SAFETY: closing the keeper's end, which this process does not use.
    unsafe { libc::close(status_pipe[0]) };
    EXIT_PIPE.store(status_pipe[1], std::sync::atomic::Ordering::Relaxed);
    // The VMM, first process of its PID namespace.
    // SAFETY: prctl/getppid/sigprocmask with valid arguments.
    unsafe {
        // The first process of a PID namespace drops any signal whose action is the default
        // when it is delivered: the stop signals stay blocked (the VMM blocks them in every
        // thread and reads them from a signalfd, which takes those already pending, such as
        // a stop the keeper passed on during the start), and get a handler besides.
        let mut keep = old;
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(s, &sa, std::ptr::null_mut());
            libc::sigaddset(&mut keep, s);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &keep, std::ptr::null_mut());
    }
    // The host knows the VM by its keeper's pid (the VMM's own is 1 in here): VMKFS records
    // that one as its disks' writer.
    wv_vmkfs::set_owner_pid(u32::try_from(keeper_pid).unwrap_or(0));
    build_root(j)?;
    if incoming {
        if let Ok(fd) = crate::postcopy::open_userfaultfd() {
            put(USERFAULTFD, fd)?;
        }
    }
    limits(j, memory)?;
    drop_privileges(j)?;
    // The parent-death signal, set once the user has changed (a change of credentials
    // clears it).
    // SAFETY: prctl, poll and close with valid arguments; `keeper` is our pidfd.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // A keeper that died before that would never send it: its pidfd is readable then.
        let mut p = libc::pollfd {
            fd: keeper,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut p, 1, 0) != 0 {
            libc::_exit(128 + libc::SIGKILL);
        }
        libc::close(keeper);
    }
    Ok(())
}

extern "C" fn ignore(_: libc::c_int) {}

/// The jailed VMM's end of the status pipe to its keeper (-1: not jailed).
static EXIT_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Tells the keeper the status the jailed VMM is about to exit with: the keeper ends with it
/// as soon as the VMM's files are closed (when the pipe's last writer, the VMM or its
/// teardown helper, has closed it), without waiting for KVM's teardown. Nothing unjailed.
pub fn report_exit(status: u8) {
    let fd = EXIT_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: one byte written from our buffer to our pipe.
        unsafe { libc::write(fd, [status].as_ptr().cast(), 1) };
    }
}

/// The keeper: passes the stop signals on to the VMM `child` and ends as it does: with the
/// status the VMM reported on `status` once the pipe's writers are gone, else when the VMM
/// has been reaped.
fn keep(child: libc::pid_t, set: &libc::sigset_t, stop: &[libc::c_int], status: i32) -> ! {
    // The keeper holds none of the VMM's files (its copies of the handed-over table and of
    // any listener): a backend, a lock or a peer sees the VMM's end as soon as it ends.
    // SAFETY: close_range around the status pipe's read end, above stderr; nothing in this
    // process uses them again (the keeper never returns, so nothing drops the table's
    // copies).
    unsafe {
        if status > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (status - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (status + 1) as u32, u32::MAX, 0u32);
    }
    // SAFETY: a signalfd for the blocked set; -1 is handled (the pipe alone then wakes us,
    // and SIGCHLD is never read: the pipe's end, at the VMM's, still ends the wait).
    let sigfd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    let mut reported: Option<u8> = None;
    let mut pipe_open = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if pipe_open { status } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds we own (a negative fd is skipped).
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            let mut b = [0u8; 1];
            // SAFETY: reading one byte into our buffer.
            match unsafe { libc::read(status, b.as_mut_ptr().cast(), 1) } {
                1 => reported = Some(b[0]),
                0 => {
                    pipe_open = false;
                    if let Some(s) = reported {
                        // The VMM's files are closed: what is left is KVM's teardown.
                        // SAFETY: ending the process.
                        unsafe { libc::_exit(i32::from(s)) };
                    }
                }
                _ => pipe_open = false,
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        // SAFETY: signalfd_siginfo is plain data; read fills it from our signalfd.
        let sig = unsafe {
            let mut si: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                sigfd,
                std::ptr::addr_of_mut!(si).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                continue;
            }
            si.ssi_signo as libc::c_int
        };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
            if r == child {
                if libc::WIFEXITED(status) {
                    // SAFETY: ending the process.
                    unsafe { libc::_exit(libc::WEXITSTATUS(status)) };
                }
                if libc::WIFSIGNALED(status) {
                    let s = libc::WTERMSIG(status);
                    // SAFETY: no core file (the keeper holds nothing worth one), the default
                    // action of the VMM's signal, then the signal itself, unblocked: the
                    // keeper ends as the VMM did.
                    unsafe {
                        let none = libc::rlimit {
                            rlim_cur: 0,
                            rlim_max: 0,
                        };
                        libc::setrlimit(libc::RLIMIT_CORE, &none);
                        libc::signal(s, libc::SIG_DFL);
                        let mut one: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut one);
                        libc::sigaddset(&mut one, s);
                        libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                        libc::kill(libc::getpid(), s);
                        libc::_exit(128 + s);
                    }
                }
            }
        } else if stop.contains(&sig) {
            // SAFETY: kill of our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// The jail's root: a tmpfs holding the few devices, `/proc` and the host folder, pivoted to
/// and made read-only.
fn build_root(j: &JailConfig) -> Result<(), VmmError> {
    let root = Path::new(BUILD_AT);
    // Held open from before the tmpfs, which may hide it (a folder under /tmp), and bound
    // from its descriptor.
    let dir = match &j.dir {
        Some(d) => Some((
            d,
            std::fs::File::open(d)
                .map_err(|e| config_err(format!("--jail dir={}: {e}", d.display())))?,
        )),
        None => None,
    };
    // Nothing done here may reach the host's mounts.
    mount("", Path::new("/"), "", libc::MS_REC | libc::MS_PRIVATE, "")?;
    mount(
        "tmpfs",
        root,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "size=1m,mode=0755",
    )?;
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p)
            .map_err(|e| VmmError::Internal(format!("--jail: mkdir {}: {e}", p.display())))
    };
    mkdir(&root.join("dev"))?;
    mkdir(&root.join("proc"))?;
    for d in ["null", "zero", "random", "urandom"] {
        let at = root.join("dev").join(d);
        std::fs::File::create(&at)
            .map_err(|e| VmmError::Internal(format!("--jail: {}: {e}", at.display())))?;
        mount(&format!("/dev/{d}"), &at, "", libc::MS_BIND, "")?;
    }
    if let Some((d, f)) = &dir {
        let at = root.join(d.strip_prefix("/").unwrap_or(d));
        mkdir(&at)?;
        let from = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f));
        mount(&from, &at, "", libc::MS_BIND | libc::MS_REC, "")?;
        mount(
            "",
            &at,
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        )?;
    }
    let old = root.join("old");
    mkdir(&old)?;
    let (r, o) = (cstr(root)?, cstr(&old)?);
    // SAFETY: pivot_root with two NUL-terminated paths; we own the mount namespace.
    if unsafe { libc::syscall(libc::SYS_pivot_root, r.as_ptr(), o.as_ptr()) } != 0 {
        return Err(os_err("pivot_root"));
    }
    std::env::set_current_dir("/").map_err(|e| VmmError::Internal(format!("--jail: {e}")))?;
    let old = CString::new("/old").unwrap_or_default();
    // SAFETY: detaching the old root, a NUL-terminated path.
    if unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os_err("unmounting the old root"));
    }
    let _ = std::fs::remove_dir("/old");
    mount(
        "proc",
        Path::new("/proc"),
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount(
        "",
        Path::new("/"),
        "",
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    drop(dir);
    if let Some(d) = &j.dir {
        std::env::set_current_dir(d).map_err(|e| VmmError::Internal(format!("--jail: {e}")))?;
    }
    Ok(())
}

/// Headroom over guest RAM in the address-space limit: the VMM's code, heaps (glibc reserves
/// 64 MiB per arena), thread stacks and device buffers.
const AS_HEADROOM: u64 = 4 << 30;

/// Most processes and threads of the jail's user.
const NPROC: u64 = 1024;

fn limits(j: &JailConfig, memory: Option<u64>) -> Result<(), VmmError> {
    let set = |res: libc::__rlimit_resource_t, n: u64, what: &str| {
        let l = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: setrlimit reads a valid rlimit.
        if unsafe { libc::setrlimit(res, &l) } != 0 {
            return Err(os_err(what));
        }
        Ok(())
    };
    set(libc::RLIMIT_NOFILE, j.nofile, "RLIMIT_NOFILE")?;
    set(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    set(libc::RLIMIT_NPROC, NPROC, "RLIMIT_NPROC")?;
    if let Some(m) = memory {
        set(libc::RLIMIT_AS, m.saturating_add(AS_HEADROOM), "RLIMIT_AS")?;
    }
    Ok(())
}

/// Becomes the jail's user: no supplementary groups, no capabilities (none permitted, none in
/// the bounding or ambient sets), no new privileges through exec.
fn drop_privileges(j: &JailConfig) -> Result<(), VmmError> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // SAFETY: prctl and the set*id calls take integers; the process is single-threaded.
    unsafe {
        for cap in 0..=last {
            if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0 {
                return Err(os_err("dropping the bounding set"));
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return Err(os_err("clearing the ambient capabilities"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_err("setgroups"));
        }
        if libc::setresgid(j.gid, j.gid, j.gid) != 0 {
            return Err(os_err("setresgid"));
        }
        if libc::setresuid(j.uid, j.uid, j.uid) != 0 {
            return Err(os_err("setresuid"));
        }
        // A change of user makes the process undumpable, which gives its /proc files to
        // root: the VMM reads its own (statm, pagemap), and nobody else runs as this user.
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_err("no_new_privs"));
        }
        if libc::getuid() != j.uid || libc::geteuid() != j.uid {
            return Err(VmmError::Internal("--jail: the user did not change".into()));
        }
    }
    Ok(())
}
