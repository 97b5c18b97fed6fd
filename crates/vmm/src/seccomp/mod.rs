//! Per-thread system-call filters (seccomp-bpf, compiled by our own generator, `bpf.rs`): the
//! kinds of thread a `wv run` VMM has, the calls each may make (one file per kind beside this
//! one, each call with who needs it), how a thread installs its filter, and what a call
//! outside its list does (`--seccomp`, [`SeccompMode`]).
//!
//! - [`prepare`] compiles every kind's filter once, on the main thread before the VM's threads
//!   start, and installs the SIGSYS handler; each thread then calls [`install`] with its kind
//!   as its first act. A thread created by a filtered thread inherits its creator's filter
//!   (filters add up: a call must pass each), so threads created while the VM runs (device
//!   workers, started by whichever thread activates a device) are created by the `spawner`
//!   thread ([`wv_devices::thread`]), whose list is the union of theirs; the API thread's list
//!   covers its connection threads, the control thread's its migration helper, the main
//!   thread's the teardown helper (a raw clone sharing its memory, which then narrows itself to
//!   the `teardown` list).
//! - A call outside the list traps (SECCOMP_RET_TRAP): the handler writes
//!   `wv: SECCOMP: thread KIND made a forbidden system call NAME (NR) ...` on stderr with raw
//!   system calls only, and under `kill` ends the process with [`STATUS_SECCOMP`] (208).
//!   SECCOMP_RET_KILL_PROCESS would say nothing, and SECCOMP_RET_LOG writes to the kernel's
//!   audit log, which an operator may not be able to read.
//! - Under `log` the handler reports the call and then makes it itself, through one `syscall`
//!   instruction that the log-mode filters let through whatever it calls (they allow calls
//!   from that instruction's address), and hands its result back: the program sees what it
//!   would have seen without a filter. Limits: the call runs inside a signal handler (SIGSYS
//!   blocked), and the calls that cannot be made from one (`clone`, `clone3`, `vfork`,
//!   `rt_sigreturn`) are reported and end the process even under `log`. `log` is for finding
//!   what a list lacks, not for production: any code that jumps to that instruction passes.
//! - `off` installs nothing.
//!
//! Debug hook for the tests: with `WV_SECCOMP_PROBE=KIND` in the environment, the first thread
//! of kind KIND calls `getpgid(0)`, which no list allows, right after installing its filter.

mod api;
mod bpf;
mod common;
mod control;
mod ioctls;
mod irq_relay;
mod main_thread;
mod migration;
mod names;
mod postcopy;
mod spawner;
mod teardown;
mod vcpu;
mod vhost_user_net;
mod virtio_balloon;
mod virtio_blk;
mod virtio_net;
mod virtio_rng;

use crate::error::STATUS_SECCOMP;
pub(crate) use bpf::Insn;
use bpf::{Cmp, Cond, Width};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
pub use wv_config::SeccompMode;

/// The kinds of VMM thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread: builds the VM, runs vCPU 0, then ends the process (exit hooks, the
    /// teardown helper, the exit report).
    Main,
    /// vCPUs 1 and up.
    Vcpu,
    /// The control loop: signals, console input (stdin and the console socket), API commands
    /// (pause, snapshot, migration send).
    Control,
    /// The control socket's listener.
    Api,
    /// One control-socket connection.
    ApiConn,
    /// Creates device worker threads while the VM runs.
    Spawner,
    /// A virtio-blk worker (raw image or VMKFS disk).
    VirtioBlk,
    /// The virtio-net worker (a TAP).
    VirtioNet,
    /// A vhost-user net's relay: the backend's interrupts to the guest, ring stops and
    /// starts on pause, reconnection to a restarted backend.
    VhostUserNet,
    /// A vhost-user disk's relay (the same work for a disk: the same list).
    VhostUserBlk,
    /// The virtio-rng worker.
    VirtioRng,
    /// The virtio-balloon worker.
    VirtioBalloon,
    /// A post-copy migration source's reader of the target's page requests.
    MigrateBack,
    /// A post-copy target's receiver of pages.
    PostcopyRecv,
    /// A post-copy target's reader of userfaultfd faults.
    PostcopyFault,
    /// The teardown helper (a clone of the main thread, see `Resources::exit`).
    Teardown,
    /// The userspace interrupt controllers' relay (`--irqchip user`): device interrupt
    /// eventfds to messages for the vCPUs.
    IrqRelay,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 17] = [
        Kind::Main,
        Kind::Vcpu,
        Kind::Control,
        Kind::Api,
        Kind::ApiConn,
        Kind::Spawner,
        Kind::VirtioBlk,
        Kind::VirtioNet,
        Kind::VhostUserNet,
        Kind::VhostUserBlk,
        Kind::VirtioRng,
        Kind::VirtioBalloon,
        Kind::MigrateBack,
        Kind::PostcopyRecv,
        Kind::PostcopyFault,
        Kind::Teardown,
        Kind::IrqRelay,
    ];

    /// The kind's name (in reports and in `WV_SECCOMP_PROBE`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Vcpu => "vcpu",
            Kind::Control => "control",
            Kind::Api => "api",
            Kind::ApiConn => "api-conn",
            Kind::Spawner => "spawner",
            Kind::VirtioBlk => "virtio-blk",
            Kind::VirtioNet => "virtio-net",
            Kind::VhostUserNet => "vhost-user-net",
            Kind::VhostUserBlk => "vhost-user-blk",
            Kind::VirtioRng => "virtio-rng",
            Kind::VirtioBalloon => "virtio-balloon",
            Kind::MigrateBack => "migrate-back",
            Kind::PostcopyRecv => "postcopy-recv",
            Kind::PostcopyFault => "postcopy-fault",
            Kind::Teardown => "teardown",
            Kind::IrqRelay => "irq-relay",
        }
    }

    fn by_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    /// The system calls a thread of this kind may make.
    pub(crate) fn list(self) -> List {
        match self {
            Kind::Main => main_thread::list(),
            Kind::Vcpu => vcpu::list(),
            Kind::Control => control::list(),
            Kind::Api => api::list(),
            Kind::ApiConn => api::conn_list(),
            Kind::Spawner => spawner::list(),
            Kind::VirtioBlk => virtio_blk::list(),
            Kind::VirtioNet => virtio_net::list(),
            Kind::VhostUserNet | Kind::VhostUserBlk => vhost_user_net::list(),
            Kind::VirtioRng => virtio_rng::list(),
            Kind::VirtioBalloon => virtio_balloon::list(),
            Kind::MigrateBack => migration::back_list(),
            Kind::PostcopyRecv => postcopy::recv_list(),
            Kind::PostcopyFault => postcopy::fault_list(),
            Kind::Teardown => teardown::list(),
            Kind::IrqRelay => irq_relay::list(),
        }
    }
}

/// An allowed list: per system call, either any arguments (`None`) or the argument patterns
/// (each a list of conditions that must all hold) of which one must match.
#[derive(Clone, Default)]
pub(crate) struct List(bpf::Rules);

impl List {
    /// Allows `nr` with any arguments.
    pub(crate) fn allow(mut self, nr: i64) -> List {
        self.0.insert(nr, None);
        self
    }

    /// Allows `nr` when every condition of `conds` holds (or as before, if already allowed).
    fn allow_if(mut self, nr: i64, conds: Vec<Cond>) -> List {
        // Already allowed with any arguments: stays so.
        if let Some(rules) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(conds);
        }
        self
    }

    /// Allows `nr` when argument `arg` (as 64 bits) is `value`.
    pub(crate) fn allow_arg(self, nr: i64, arg: u8, value: u64) -> List {
        self.allow_if(nr, vec![(arg, Width::Qword, Cmp::Eq, value)])
    }

    /// Allows ioctl request `cmd` (the request is an `unsigned int` to the kernel: 32 bits).
    pub(crate) fn ioctl(self, cmd: u64) -> List {
        self.allow_if(libc::SYS_ioctl, vec![(1, Width::Dword, Cmp::Eq, cmd)])
    }

    /// Allows `socket(family, ...)`.
    pub(crate) fn socket(self, family: i32) -> List {
        self.allow_if(
            libc::SYS_socket,
            vec![(0, Width::Dword, Cmp::Eq, u64::from(family.unsigned_abs()))],
        )
    }

    /// Allows `nr` when argument `arg` has none of the bits of `mask`.
    pub(crate) fn allow_without_bits(self, nr: i64, arg: u8, mask: u64) -> List {
        self.allow_if(nr, vec![(arg, Width::Qword, Cmp::MaskedEq(mask), 0)])
    }

    /// Allows `nr` when the bits `mask` of argument `arg` are `value`.
    pub(crate) fn allow_masked(self, nr: i64, arg: u8, mask: u64, value: u64) -> List {
        self.allow_if(nr, vec![(arg, Width::Qword, Cmp::MaskedEq(mask), value)])
    }

    /// Allows `fcntl(fd, cmd, ...)` for `cmd`.
    pub(crate) fn fcntl(self, cmd: i32) -> List {
        self.allow_if(
            libc::SYS_fcntl,
            vec![(1, Width::Dword, Cmp::Eq, u64::from(cmd.unsigned_abs()))],
        )
    }

    /// Everything `other` allows as well.
    pub(crate) fn with(mut self, other: List) -> List {
        for (nr, rules) in other.0 {
            match rules {
                None => self = self.allow(nr),
                Some(rs) => {
                    for r in rs {
                        self = self.allow_if(nr, r);
                    }
                }
            }
        }
        self
    }

    /// Whether `nr` is allowed with some arguments.
    #[cfg(test)]
    pub(crate) fn has(&self, nr: i64) -> bool {
        self.0.contains_key(&nr)
    }

    /// The list's program for `mode` (kill or log).
    fn compile(&self, mode: SeccompMode) -> Result<Vec<Insn>, String> {
        // Log: anything called from the handler's own `syscall` instruction passes (the
        // address is that of the instruction after it, as the kernel reports it).
        bpf::generate(&self.0, (mode == SeccompMode::Log).then(gate_address))
    }
}

// The log mode's way out: `wv_seccomp_call(nr, a0..a5)` makes system call `nr` from the one
// `syscall` instruction log-mode filters let through (`wv_seccomp_gate` is the address after it).
std::arch::global_asm!(
    ".pushsection .text.wv_seccomp_call,\"ax\",@progbits",
    ".globl wv_seccomp_call",
    ".type wv_seccomp_call,@function",
    "wv_seccomp_call:",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, [rsp + 8]",
    "syscall",
    ".globl wv_seccomp_gate",
    "wv_seccomp_gate:",
    "ret",
    ".size wv_seccomp_call, . - wv_seccomp_call",
    ".popsection",
);

extern "C" {
    fn wv_seccomp_call(nr: i64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64;
    static wv_seccomp_gate: u8;
}

fn gate_address() -> u64 {
    // Only the address is taken: the symbol is a code label, never read.
    std::ptr::addr_of!(wv_seccomp_gate) as u64
}

/// The compiled filters, by [`Kind::index`].
struct Filters {
    progs: Vec<Vec<Insn>>,
    /// The kind `WV_SECCOMP_PROBE` names, if any.
    probe: Option<Kind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();
/// The compilation [`prepare`] started on a thread of its own (so that it overlaps the VM's
/// set-up on another CPU), until the first thread that needs the filters takes its result.
static COMPILING: Mutex<Option<JoinHandle<Result<Filters, String>>>> = Mutex::new(None);

/// The compiled filters (waiting for their compilation if it is still running); None when
/// filters are off. A list that does not compile ends the process (unit tests compile every
/// list in both modes, so this is a programming error).
fn filters() -> Option<&'static Filters> {
    if let Some(f) = FILTERS.get() {
        return Some(f);
    }
    let mut compiling = COMPILING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = FILTERS.get() {
        return Some(f);
    }
    let done = compiling.take()?.join();
    match done {
        Ok(Ok(f)) => {
            let _ = FILTERS.set(f);
        }
        Ok(Err(e)) => {
            eprintln!("wv: {e}");
            // SAFETY: ending the process at once: no thread may run unguarded.
            unsafe { libc::_exit(i32::from(crate::error::STATUS_INTERNAL)) };
        }
        Err(_) => {
            eprintln!("wv: compiling the seccomp filters failed (the thread panicked)");
            // SAFETY: as above.
            unsafe { libc::_exit(i32::from(crate::error::STATUS_INTERNAL)) };
        }
    }
    FILTERS.get()
}
/// The mode in force, for the handler: 0 off, 1 log, 2 kill.
static MODE: AtomicU8 = AtomicU8::new(0);
/// Whether the probe call was made already.
static PROBED: AtomicBool = AtomicBool::new(false);
/// The thread id of the teardown helper (which shares the main thread's thread-local storage).
static TEARDOWN_TID: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// This thread's kind, for the report of a refused call ("starting": a thread that has not
    /// installed its own filter yet and runs under its creator's).
    static KIND: Cell<&'static str> = const { Cell::new("starting") };
}

/// Compiles every kind's filter for `mode`, installs the SIGSYS handler and the device-thread
/// spawner; then [`install`] applies them. Once per process (later calls do nothing).
pub(crate) fn prepare(mode: SeccompMode) -> Result<(), String> {
    if mode == SeccompMode::Off || MODE.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    fix_malloc_arenas();
    let probe = match std::env::var("WV_SECCOMP_PROBE") {
        Ok(v) => Some(
            Kind::by_name(&v)
                .ok_or_else(|| format!("WV_SECCOMP_PROBE={v}: no thread kind has that name"))?,
        ),
        Err(_) => None,
    };
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and only
    // makes async-signal-safe system calls; sigaction's result is checked.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(format!(
            "installing the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        ));
    }
    MODE.store(
        if mode == SeccompMode::Log { 1 } else { 2 },
        Ordering::Release,
    );
    // Compiled on a thread of its own, which overlaps the VM's set-up on another CPU (the
    // fourteen programs took 0.3-2 ms with seccompiler, ~0.9 ms in a debug build with
    // bpf.rs); the first thread to install a filter waits for it.
    let compile = std::thread::Builder::new()
        .name("seccomp-compile".into())
        .spawn(move || {
            // Started before the main thread blocks the stop signals: block them here, so that
            // none is delivered to this thread with its default action.
            crate::block_signals(&crate::STOP_SIGNALS);
            let progs = Kind::ALL
                .iter()
                .map(|k| {
                    k.list().compile(mode).map_err(|e| {
                        format!(
                            "compiling the seccomp filter of thread kind {}: {e}",
                            k.name()
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Filters { progs, probe })
        })
        .map_err(|e| format!("starting the seccomp compilation: {e}"))?;
    *COMPILING.lock().unwrap_or_else(|p| p.into_inner()) = Some(compile);
    spawner::start().map_err(|e| format!("starting the thread spawner: {e}"))?;
    Ok(())
}

/// glibc's malloc works out its limit on arenas from the number of CPUs the first time a
/// process uses more than 8 of them, reading `/sys/devices/system/cpu/online` (openat) from
/// whichever thread allocates then: any thread once the VMM runs many at a time (found under
/// a burst of control-socket connections, by vmm_openapi's test). The same limit as glibc's
/// default (8 arenas per CPU online) is set here, before any filter, so malloc never reads it.
fn fix_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: sysconf and mallopt have no preconditions; mallopt only sets a malloc tunable.
        unsafe {
            let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 16);
            let arenas = i32::try_from(cpus * 8).unwrap_or(i32::MAX);
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Installs the filter of `kind` on the calling thread (nothing when filters are off). A
/// filter that cannot be installed ends the process: the thread would run unguarded.
pub(crate) fn install(kind: Kind) {
    let Some(f) = filters() else { return };
    KIND.with(|k| k.set(kind.name()));
    if let Err(e) = apply(&f.progs[kind.index()]) {
        eprintln!(
            "wv: cannot install the seccomp filter of thread kind {}: {e}",
            kind.name()
        );
        // SAFETY: ending the process at once; nothing is left to flush.
        unsafe { libc::_exit(i32::from(crate::error::STATUS_INTERNAL)) };
    }
    probe(kind);
}

/// Installs `prog` on the calling thread: no_new_privs (which an unprivileged filter needs),
/// then the filter.
fn apply(prog: &[Insn]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) only sets a flag of the calling thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel copies the program in (`fprog` points at `prog`, alive for the call).
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`install`] for a thread started through [`wv_devices::thread::spawn`], by kind name.
fn install_named(name: &'static str) {
    let kind = match name {
        "virtio-blk" => Kind::VirtioBlk,
        "virtio-net" => Kind::VirtioNet,
        "vhost-user-net" => Kind::VhostUserNet,
        "vhost-user-blk" => Kind::VhostUserBlk,
        "virtio-rng" => Kind::VirtioRng,
        "virtio-balloon" => Kind::VirtioBalloon,
        // An unknown worker gets the narrowest device list.
        _ => Kind::VirtioRng,
    };
    install(kind);
}

/// The `WV_SECCOMP_PROBE` hook: a call no list allows, once, from the first thread of the
/// named kind.
fn probe(kind: Kind) {
    let Some(f) = filters() else { return };
    if f.probe == Some(kind) && !PROBED.swap(true, Ordering::AcqRel) {
        // SAFETY: getpgid(0) only reads the caller's process group.
        unsafe { libc::syscall(libc::SYS_getpgid, 0) };
    }
}

/// What the teardown helper needs to narrow itself to its list: the program (empty when
/// filters are off) and whether it makes the probe call. Leaked: the helper outlives `wv`.
pub(crate) fn teardown_filter() -> (&'static [Insn], bool) {
    match filters() {
        None => (&[], false),
        Some(f) => (
            &f.progs[Kind::Teardown.index()],
            f.probe == Some(Kind::Teardown),
        ),
    }
}

/// Records the teardown helper's thread id (for the report of a refused call).
pub(crate) fn set_teardown_tid(tid: i32) {
    TEARDOWN_TID.store(tid, Ordering::Release);
}

/// In the teardown helper: installs `prog` (the teardown list) with raw system calls, then
/// the probe call if asked; true when installed.
pub(crate) fn install_raw(prog: &[Insn], probe: bool) -> bool {
    if prog.is_empty() {
        return false;
    }
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).unwrap_or(u16::MAX),
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program in; no_new_privs was set by the main thread's own
    // filter and is inherited.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r == 0 && probe {
        // SAFETY: as in `probe`.
        unsafe { libc::syscall(libc::SYS_getpgid, 0) };
    }
    r == 0
}

/// The name of system call `nr`.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
        .unwrap_or("unknown")
}

/// A line built in a fixed buffer (no allocation: the handler runs at any point).
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn num(&mut self, mut v: u64, hex: bool) {
        let base = if hex { 16 } else { 10 };
        let mut d = [0u8; 20];
        let mut n = 0;
        loop {
            d[n] = b"0123456789abcdef"[usize::try_from(v % base).unwrap_or(0)];
            n += 1;
            v /= base;
            if v == 0 {
                break;
            }
        }
        if hex {
            self.push(b"0x");
        }
        for i in (0..n).rev() {
            self.push(&d[i..=i]);
        }
    }
}

/// `siginfo_t` for SIGSYS on x86-64 (`_sigsys`: call address, system call number, arch).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: u64,
    syscall: i32,
    arch: u32,
}

/// The system calls that cannot be made again from inside the handler.
fn not_from_handler(nr: i64) -> bool {
    [
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_vfork,
        libc::SYS_rt_sigreturn,
    ]
    .contains(&nr)
}

/// SIGSYS: reports the refused call; ends the process (kill) or makes the call (log).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo, whose layout SigsysInfo mirrors.
    let nr = i64::from(unsafe { (*info.cast::<SigsysInfo>()).syscall });
    // SAFETY: with SA_SIGINFO the third argument is the interrupted context.
    let regs = unsafe { &mut (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let reg = |r: libc::c_int| regs[usize::try_from(r).unwrap_or(0)] as u64;
    let args = [
        reg(libc::REG_RDI),
        reg(libc::REG_RSI),
        reg(libc::REG_RDX),
        reg(libc::REG_R10),
        reg(libc::REG_R8),
        reg(libc::REG_R9),
    ];
    let log = MODE.load(Ordering::Acquire) == 1;
    let let_through = log && !not_from_handler(nr);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let kind = if tid == i64::from(TEARDOWN_TID.load(Ordering::Acquire)) {
        "teardown"
    } else {
        KIND.with(Cell::get)
    };
    let mut l = Line {
        buf: [0; 320],
        len: 0,
    };
    l.push(if log {
        b"wv: SECCOMP (log): thread "
    } else {
        b"wv: SECCOMP: thread "
    });
    l.push(kind.as_bytes());
    l.push(if let_through {
        b" made system call "
    } else {
        b" made a forbidden system call "
    });
    l.push(syscall_name(nr).as_bytes());
    l.push(b" (");
    l.num(nr.unsigned_abs(), false);
    l.push(b") with arguments ");
    for (i, a) in args.iter().take(3).enumerate() {
        if i > 0 {
            l.push(b", ");
        }
        l.num(*a, true);
    }
    if let_through {
        l.push(b"; outside its list, let through\n");
    } else if kind == "teardown" {
        // A process of its own: exit_group ends it, not wv (which has its status already).
        l.push(b"; ending the teardown helper (status 208)\n");
    } else {
        l.push(b"; ending wv (status 208)\n");
    }
    // SAFETY: writing a local buffer to stderr; write is in every list.
    unsafe { libc::write(2, l.buf.as_ptr().cast(), l.len) };
    if !let_through {
        // SAFETY: ending the process at once, as the report says.
        unsafe { libc::syscall(libc::SYS_exit_group, i32::from(STATUS_SECCOMP)) };
    }
    // SAFETY: the call as the program made it, through the log mode's gate; its result goes
    // where the program expects it (rax), as if the call had returned normally.
    let ret = unsafe { wv_seccomp_call(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    regs[usize::try_from(libc::REG_RAX).unwrap_or(0)] = ret;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_in_both_modes() {
        for k in Kind::ALL {
            for m in [SeccompMode::Log, SeccompMode::Kill] {
                let p = k.list().compile(m).unwrap();
                assert!(p.len() < 4096, "{}: {} instructions", k.name(), p.len());
            }
        }
    }

    #[test]
    fn no_list_allows_the_probe_call() {
        for k in Kind::ALL {
            assert!(!k.list().has(libc::SYS_getpgid), "{}", k.name());
        }
    }

    #[test]
    fn every_list_lets_the_report_out() {
        for k in Kind::ALL {
            let l = k.list();
            assert!(l.has(libc::SYS_write), "{}", k.name());
            assert!(l.has(libc::SYS_exit_group), "{}", k.name());
        }
    }

    /// Where a filter's start-up cost goes, per kind, seccompiler's linear chains (the
    /// reference in `bpf.rs`'s tests, what `wv` ran before its own generator) against the
    /// generator's search: the program's length, the generator's time, the kernel's
    /// installation (on a fresh thread each, median of 7), and then calls through it: fcntl on
    /// a bad descriptor (an argument check, so the filter runs) and gettid (argument-free: as
    /// cheap as without a filter when the kernel's always-allowed cache has it). The first
    /// row is the shortest program there is (the architecture checked, everything allowed):
    /// the installation's floor. Prints; asserts nothing but that each step works.
    /// `cargo test -p wv-vmm --lib seccomp_costs -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement: run by hand with --ignored --nocapture"]
    fn seccomp_costs() {
        use std::time::{Duration, Instant};
        let call = || {
            let t = Instant::now();
            for _ in 0..10_000 {
                // SAFETY: fcntl on descriptor -1 only fails (EBADF).
                unsafe { libc::fcntl(-1, libc::F_GETFD) };
            }
            let fcntl = t.elapsed().as_nanos() / 10_000;
            let t = Instant::now();
            for _ in 0..10_000 {
                // SAFETY: gettid has no preconditions.
                unsafe { libc::syscall(libc::SYS_gettid) };
            }
            (fcntl, t.elapsed().as_nanos() / 10_000)
        };
        // Median installation time of `prog` (each on a fresh, unfiltered thread), and the
        // cost of a call under it.
        let install = |prog: &Vec<Insn>| {
            let mut runs: Vec<(Duration, (u128, u128))> = (0..7)
                .map(|_| {
                    let p = prog.clone();
                    std::thread::spawn(move || {
                        let t = Instant::now();
                        apply(&p).unwrap();
                        (t.elapsed(), call())
                    })
                    .join()
                    .unwrap()
                })
                .collect();
            runs.sort();
            (runs[3].0.as_secs_f64() * 1e6, runs[3].1)
        };
        let (f, g) = call();
        println!("no filter: fcntl {f} ns, gettid {g} ns");
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{:>15}  {:>5} {:>5}  {:>9} {:>9}  {:>9} {:>9}  {:>6} {:>6}  {:>6} {:>6}",
            "kind", "insns", "", "generate", "", "install", "", "fcntl", "", "gettid", ""
        );
        println!(
            "{:>15}  {:>5} {:>5}  {:>9} {:>9}  {:>9} {:>9}  {:>6} {:>6}  {:>6} {:>6}",
            "",
            "old",
            "new",
            "old us",
            "new us",
            "old us",
            "new us",
            "old ns",
            "new ns",
            "old ns",
            "new ns"
        );
        let floor = vec![
            Insn {
                code: bpf::BPF_LD | bpf::BPF_W | bpf::BPF_ABS,
                jt: 0,
                jf: 0,
                k: 4,
            },
            Insn {
                code: bpf::BPF_JMP | bpf::BPF_JEQ | bpf::BPF_K,
                jt: 1,
                jf: 0,
                k: bpf::AUDIT_ARCH_X86_64,
            },
            Insn {
                code: bpf::BPF_RET | bpf::BPF_K,
                jt: 0,
                jf: 0,
                k: bpf::SECCOMP_RET_KILL_PROCESS,
            },
            Insn {
                code: bpf::BPF_RET | bpf::BPF_K,
                jt: 0,
                jf: 0,
                k: bpf::SECCOMP_RET_ALLOW,
            },
        ];
        let (ins, (f, g)) = install(&floor);
        println!(
            "{:>15}  {:5} {:5}  {:>9} {:>9}  {ins:9.1} {ins:9.1}  {f:6} {f:6}  {g:6} {g:6}",
            "allow all", 4, 4, "", ""
        );
        let common = common::list();
        // The teardown list is too narrow for a std thread's own end.
        let kinds = Kind::ALL.into_iter().filter(|k| *k != Kind::Teardown);
        let lists =
            std::iter::once(("common only", common)).chain(kinds.map(|k| (k.name(), k.list())));
        for (name, list) in lists {
            let t = Instant::now();
            let old = bpf::tests::seccompiler_program(&list.0, None);
            let old_gen = t.elapsed();
            let t = Instant::now();
            let new = list.compile(SeccompMode::Kill).unwrap();
            let new_gen = t.elapsed();
            let (old_ins, (old_f, old_g)) = install(&old);
            let (new_ins, (new_f, new_g)) = install(&new);
            println!(
                "{name:>15}  {:5} {:5}  {:9.1} {:9.1}  {old_ins:9.1} {new_ins:9.1}  {old_f:6} {new_f:6}  {old_g:6} {new_g:6}",
                old.len(),
                new.len(),
                us(old_gen),
                us(new_gen),
            );
        }
    }

    #[test]
    fn names_come_from_the_table() {
        assert_eq!(syscall_name(libc::SYS_read), "read");
        assert_eq!(syscall_name(libc::SYS_ioctl), "ioctl");
        assert_eq!(syscall_name(libc::SYS_getpgid), "getpgid");
        assert_eq!(syscall_name(-1), "unknown");
        assert_eq!(syscall_name(100_000), "unknown");
    }

    #[test]
    fn kinds_are_found_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::by_name(k.name()), Some(k));
        }
        assert_eq!(Kind::by_name("nope"), None);
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut l = Line {
            buf: [0; 320],
            len: 0,
        };
        l.num(0, false);
        l.push(b" ");
        l.num(208, false);
        l.push(b" ");
        l.num(0xae80, true);
        assert_eq!(&l.buf[..l.len], b"0 208 0xae80");
    }
}
