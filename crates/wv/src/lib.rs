//! `wv`, the Worldvisor command-line tool, as a library behind two binaries:
//! - `wv` (`src/main.rs`): `wv run` itself, and every other command handed to `wv-admin` beside it
//!   by `exec` (same process, same arguments), so the VMM's binary holds the VMM and its small
//!   option scanner and nothing else (no clap, no daemon, no web console): it is the start-up path
//!   of every VM, and its size shows in each VMM's start-up and resident memory
//!   (docs/PERFORMANCE.md, "The command line and `wv run`'s start-up");
//! - `wv-admin` (`src/bin/wv-admin.rs`): every command, `wv run` included, through [`main_admin`].
//!
//! The commands:
//! - `wv run`: boot one VM in the foreground (the embedded probe guest unless `--kernel`);
//! - `wv probe-image`: write an embedded guest image to a file (for QEMU or other loaders);
//! - `wv host`, `wv vm`: the host daemon and its client;
//! - `wv fs`: VMKFS datastores ([`fs`]).
//!
//! [`cli`] parses every command line into a typed [`cli::Command`] (`wv run` by its own scanner,
//! the other commands through clap in [`commands`]); this module runs it.

mod admin;
pub mod cli;
mod commands;
mod fs;

use cli::{Client, Command, NetCmd, RunFrom, Sched, StatsMode, Usage, VmCmd};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wv_vmm::error::STATUS_USAGE;
use wv_vmm::VmConfig;

/// The binary that runs VMs (`wv run`), beside which `wv-admin` is installed.
pub const VMM_BIN: &str = "wv";
/// The binary that runs every other command.
pub const ADMIN_BIN: &str = "wv-admin";

/// `wv run`, `wv run --help` and `wv help run`, with nothing of clap: the exit status, or None
/// for any other command line (the caller hands it to [`main_admin`]'s binary).
pub fn main_vmm(args: &[String]) -> Option<ExitCode> {
    let cmd = match cli::parse_vmm(args)? {
        Ok(c) => c,
        Err(Usage(m)) => return Some(fail(STATUS_USAGE, &m)),
    };
    Some(match cmd {
        Command::Run(cfg, stats, from, jail) => cmd_run(&cfg, stats, &from, jail.as_deref()),
        Command::Help(text) => print_help(&text),
        _ => fail(
            wv_vmm::error::STATUS_INTERNAL,
            "the VMM's parser gave a command it does not run",
        ),
    })
}

/// The binary `name` beside this one (`wv` and `wv-admin` are installed together), or this
/// one when it cannot be found there.
pub fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(VMM_BIN));
    let other = me.with_file_name(name);
    if other.is_file() {
        other
    } else {
        me
    }
}

fn print_help(text: &str) -> ExitCode {
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    println!("{text}");
    ExitCode::SUCCESS
}

/// Every command (`wv-admin`'s whole job, and `wv`'s when run as one binary): the exit status.
pub fn main_admin(args: &[String]) -> ExitCode {
    let cmd = match cli::parse(args) {
        Ok(c) => c,
        Err(Usage(m)) => return fail(STATUS_USAGE, &m),
    };
    // Commands that only print (help, listings, tables) end quietly when their reader goes
    // away (`wv vm list | head`), as other command-line tools do; the VMM, the daemon and the
    // console keep SIGPIPE ignored and handle EPIPE themselves.
    let printer = match &cmd {
        Command::Help(_)
        | Command::HostStatus(_)
        | Command::HostMemory(_)
        | Command::HostStorage(..)
        | Command::HostTop(..)
        | Command::HostToken(_)
        | Command::HostShutdown(_)
        | Command::HostInstall { .. }
        | Command::HostUninstall(..) => true,
        Command::Vm(_, VmCmd::Named(what, _)) => *what != "console",
        Command::Vm(..) | Command::Net(..) | Command::Fs(_) | Command::Completions(_) => true,
        Command::Run(..)
        | Command::ProbeImage { .. }
        | Command::Node(_)
        | Command::HostServe { .. }
        | Command::Vswitch(_)
        | Command::Storage(_) => false,
    };
    if printer {
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cmd {
        Command::Help(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Command::Run(cfg, stats, from, jail) => cmd_run(&cfg, stats, &from, jail.as_deref()),
        Command::ProbeImage { format, output } => cmd_probe_image(&format, &output),
        Command::Node(listen) => match wv_vmm::cluster::serve_node(&listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &format!("wv node: {e}")),
        },
        Command::Vswitch(cfg) => match wv_vswitch::run(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &format!("vswitch: {e}")),
        },
        Command::Storage(cfg) => match wv_storage::run(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, &format!("storage: {e}")),
        },
        Command::HostServe {
            socket,
            state_dir,
            listen,
            web,
            images,
            jail,
            memory,
            placement,
            storage_capacity_iops,
            storage_device_capacity,
        } => cmd_host_serve(
            &socket,
            &state_dir,
            listen.as_deref(),
            web.as_deref(),
            images,
            jail,
            memory,
            placement,
            (storage_capacity_iops, &storage_device_capacity),
        ),
        Command::HostStatus(c) => host_status(&c),
        Command::HostMemory(c) => host_memory(&c),
        Command::HostStorage(c, set) => host_storage(&c, set.as_ref()),
        Command::HostTop(c, once) => host_top(&c, once),
        Command::HostToken(dir) => {
            let path = dir.join(wv_host::api::TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => {
                    println!("{}", t.trim());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(
                    1,
                    &format!(
                        "no token in {}: {e} (the daemon makes it when it starts)",
                        path.display()
                    ),
                ),
            }
        }
        Command::HostShutdown(c) => host_shutdown(&c),
        Command::HostInstall {
            unit_dir,
            args,
            socket,
        } => {
            match admin::install(&unit_dir, &args, socket.as_deref()) {
                Ok(path) => {
                    println!("wrote {}", path.display());
                    eprintln!("enable it with: systemctl daemon-reload && systemctl enable --now worldvisor");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e),
            }
        }
        Command::HostUninstall(dir, yes) => host_uninstall(&dir, yes),
        Command::Vm(c, v) => cmd_vm(&c, v),
        Command::Net(c, n) => cmd_net(&c, n),
        Command::Fs(a) => fs::cmd_fs(&a),
        Command::Completions(script) => {
            print!("{script}");
            ExitCode::SUCCESS
        }
    }
}

fn cmd_run(cfg: &VmConfig, stats: StatsMode, from: &RunFrom, jail: Option<&cli::Jail>) -> ExitCode {
    // The VM from a snapshot or a migration; where its console and control socket go, from here.
    let local = |mut c: VmConfig| {
        c.serial = cfg.serial.clone();
        c.console_socket = cfg.console_socket.clone();
        c.api_socket = cfg.api_socket.clone();
        c.seccomp = cfg.seccomp;
        c.irqchip = cfg.irqchip;
        c
    };
    // With --jail: everything `vm` (and the jail's config=) is made of opened here, as root,
    // then into the jail before any thread starts (crates/vmm/src/jail.rs).
    let enter = |vm: Option<&VmConfig>, incoming: bool| -> Result<(), wv_vmm::error::VmmError> {
        let Some(j) = jail else { return Ok(()) };
        wv_vmm::jail::preopen_process(cfg)?;
        // With config=, its files only: a snapshot's or a migration's configuration is the
        // VMM's word, which must not choose what is opened as root (the daemon names its own
        // definition there).
        if let Some(c) = j.also.as_ref().or(vm) {
            wv_vmm::jail::preopen_vm(c)?;
        }
        if let RunFrom::Incoming(_, places, _) = from {
            if let Some(ds) = &places.datastore {
                wv_vmm::jail::preopen_datastore(ds, 16)?;
            }
        }
        wv_vmm::jail::enter(&j.spec, vm.or(j.also.as_ref()), incoming)
    };
    // Cluster mode: the other nodes, started and told their part before the VM is built.
    let mut cluster = None;
    let ran = match from {
        RunFrom::Options => enter(Some(cfg), false).and_then(|()| wv_vmm::run(cfg)),
        RunFrom::Cluster(spec) => {
            let wv = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("wv"));
            wv_vmm::cluster::Cluster::start(spec, &wv).and_then(|c| {
                let c = cluster.insert(c);
                wv_vmm::run_clustered(cfg, c)
            })
        }
        RunFrom::Snapshot(r) => wv_vmm::snapshot_config(&r.dir)
            .and_then(|c| wv_vmm::Restored::prepare(&local(c), &r.dir, &r.opts))
            .and_then(|p| enter(Some(p.config()), false).and_then(|()| p.run())),
        RunFrom::Incoming(addr, places, sockets) => wv_vmm::migrate::listen(addr).and_then(|l| {
            if let Ok(a) = l.local_addr() {
                let _ = writeln!(std::io::stderr(), "wv: waiting for a migration on {a}");
            }
            enter(None, true)?;
            let inc = wv_vmm::migrate::receive_with(&l, places)?;
            drop(l);
            let c = local(wv_vmm::with_net_sockets(inc.config(), sockets)?);
            wv_vmm::migrate::run_incoming(&c, inc)
        }),
    };
    match ran {
        Ok(mut out) => {
            if stats != StatsMode::Off {
                out.stats.kvm = out.resources.kvm_counters();
            }
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "wv: {}", out.end);
            match stats {
                StatsMode::Off => {}
                StatsMode::Table => {
                    let _ = write!(err, "{}", out.stats.to_table());
                }
                StatsMode::Json => {
                    let _ = writeln!(err, "{}", out.stats.to_json());
                }
            }
            drop(err);
            // The nodes' counters and stop, while the VM's memory is still there.
            if let Some(c) = &cluster {
                c.finish();
            }
            let status = out.end.status();
            out.resources.exit(status)
        }
        Err(e) => fail(e.status(), &e.to_string()),
    }
}

fn cmd_probe_image(format: &str, output: &Path) -> ExitCode {
    let Some(bytes) = wv_probe_images::by_name(format) else {
        return fail(
            STATUS_USAGE,
            &format!("unknown image format '{format}': use pvh, bzimage or exitbench"),
        );
    };
    match std::fs::write(output, bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(
            wv_vmm::error::STATUS_INTERNAL,
            &format!("cannot write {}: {e}", output.display()),
        ),
    }
}

fn fail(status: u8, msg: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "wv: error: {msg}");
    ExitCode::from(status)
}

fn api(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<serde_json::Value, ExitCode> {
    match wv_host::http::request(&c.socket, method, path, body) {
        Ok((s, b)) if (200..300).contains(&s) => {
            Ok(serde_json::from_str(&b).unwrap_or(serde_json::Value::Null))
        }
        Ok((s, b)) => {
            let msg = serde_json::from_str::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(b);
            Err(fail(1, &format!("{msg} (HTTP {s})")))
        }
        Err(e) => Err(fail(
            2,
            &format!(
                "cannot reach the daemon at {}: {e} (is `wv host` running?)",
                c.socket.display()
            ),
        )),
    }
}

#[allow(clippy::too_many_arguments)] // the daemon's options, one argument each
fn cmd_host_serve(
    socket: &Path,
    state_dir: &Path,
    listen: Option<&str>,
    web: Option<&str>,
    images: Vec<PathBuf>,
    jail: Option<(u32, u32)>,
    memory: wv_host::lending::Settings,
    placement: wv_host::place::Mode,
    (storage_capacity_iops, storage_devices): (u64, &[(String, u64)]),
) -> ExitCode {
    // The VMMs (and the services, which `wv` hands on to `wv-admin`) start from `wv`: the small
    // binary, so every VM's start-up and text pages are those of `wv run`.
    let d = match wv_host::api::Daemon::open(state_dir, socket, sibling(VMM_BIN)) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                1,
                &format!("cannot open the state in {}: {e}", state_dir.display()),
            )
        }
    };
    d.set_placement(placement);
    if images.is_empty() {
        eprintln!(
            "wv host: warning: no --images: a VM may take any file the daemon can read as its kernel or disk"
        );
    } else if let Err(e) = d.confine_images(&images) {
        return fail(1, &format!("--images: {e}"));
    }
    match jail {
        Some((first, last)) => {
            if let Err(e) = d.jail_vmms(first, last) {
                return fail(1, &format!("--jail-uids: {e}"));
            }
        }
        None => eprintln!(
            "wv host: warning: --no-jail: VMMs run as this daemon's user, with its privileges"
        ),
    }
    let mut capacity = d.set_storage_capacity(storage_capacity_iops);
    for (dev, n) in storage_devices {
        capacity = capacity.and(d.set_storage_device_capacity(dev, *n));
    }
    if let Err(e) = capacity {
        // Kept for the next storage service the daemon starts.
        eprintln!("wv host: warning: --storage-capacity-iops: not applied to the running storage service yet: {e}");
    }
    if let Err(e) = d.lend_memory(memory) {
        return fail(1, &format!("--host-memory-reserve: {e}"));
    }
    if memory.reserve > 0 {
        eprintln!(
            "wv host: lending memory between VMs below {} free (idle memory tax {}%)",
            wv_config::format_size(memory.reserve),
            memory.tax_pct
        );
    }
    if let Some(addr) = listen {
        let loopback = addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !loopback {
            eprintln!("wv host: warning: {addr} is not a loopback address: the API is reachable from the network (with the token: wv host token)");
        }
        if let Err(e) = wv_host::api::serve_tcp(d.clone(), addr) {
            return fail(1, &format!("cannot listen on {addr}: {e}"));
        }
        eprintln!("wv host: listening on tcp {addr} as well");
    }
    if let Some(addr) = web {
        if let Err(e) = wv_host::api::serve_web(d.clone(), addr) {
            return fail(1, &format!("cannot serve the web console on {addr}: {e}"));
        }
        eprintln!("wv host: web console on http://{addr}/ (log in with wv host token)");
    }
    eprintln!(
        "wv host: listening on {} (state in {})",
        socket.display(),
        state_dir.display()
    );
    match wv_host::api::serve(d, socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &format!("cannot serve on {}: {e}", socket.display())),
    }
}

/// `wv host shutdown`: the daemon answers once every VM is stopped and what it made outside
/// its state directory is removed, then ends.
fn host_shutdown(c: &Client) -> ExitCode {
    match api(c, "POST", "/v1/host/shutdown", None) {
        Ok(v) if c.json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            let names = |k: &str| -> Vec<String> {
                v[k].as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect()
            };
            let stopped = names("stopped");
            println!(
                "stopped {} VM{}{}{}; the daemon has ended",
                stopped.len(),
                if stopped.len() == 1 { "" } else { "s" },
                if stopped.is_empty() { "" } else { ": " },
                stopped.join(", ")
            );
            let failed = v["failed"].as_array().cloned().unwrap_or_default();
            for f in &failed {
                eprintln!(
                    "wv: VM '{}' would not stop: {}",
                    f["name"].as_str().unwrap_or("?"),
                    f["error"].as_str().unwrap_or("?")
                );
            }
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(code) => code,
    }
}

/// `wv host uninstall`.
fn host_uninstall(dir: &Path, yes: bool) -> ExitCode {
    if std::fs::symlink_metadata(dir).is_err() {
        println!("nothing to remove: {} does not exist", dir.display());
        return ExitCode::SUCCESS;
    }
    match admin::confirm_uninstall(dir, yes) {
        Ok(true) => {}
        Ok(false) => return fail(1, "not removed"),
        Err(e) => return fail(1, &e),
    }
    match wv_host::api::uninstall(dir) {
        Ok(left) => {
            for l in &left {
                eprintln!("wv: left behind: {l}");
            }
            println!("removed {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e),
    }
}

/// `wv host memory`: the lending policy and a table of every live VM's memory.
fn host_memory(c: &Client) -> ExitCode {
    match api(c, "GET", "/v1/host/memory", None) {
        Ok(v) if c.json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            let mib = |x: &serde_json::Value| {
                x.as_i64()
                    .map_or_else(|| "-".into(), |b| format!("{}M", b >> 20))
            };
            if v["enabled"] == true {
                println!(
                    "policy on: reserve {}, host free {}, idle memory tax {}%{}",
                    mib(&v["reserve_bytes"]),
                    mib(&v["host_free_bytes"]),
                    v["idle_memory_tax_pct"],
                    match v["host_memory_bytes"].as_u64() {
                        Some(h) => format!(", VMs' pool {}M", h >> 20),
                        None => String::new(),
                    }
                );
            } else {
                println!(
                    "policy off (wv host --host-memory-reserve SIZE turns it on); host free {}",
                    mib(&v["host_free_bytes"])
                );
            }
            if let Some(a) = v["last_action"].as_str().filter(|a| !a.is_empty()) {
                println!("last action: {a}");
            }
            let row = |c: [&str; 9]| {
                println!(
                    "{:<16} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
                );
            };
            row([
                "VM", "SHARES", "ACTIVE", "MEMORY", "TARGET", "CURRENT", "LENT", "BORROWED", "RSS",
            ]);
            for w in v["worlds"].as_array().into_iter().flatten() {
                let active = w["active_fraction"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |f| format!("{:.0}%", f * 100.0));
                row([
                    w["name"].as_str().unwrap_or("?"),
                    &w["shares"].to_string(),
                    &active,
                    &mib(&w["memory_bytes"]),
                    &mib(&w["target_bytes"]),
                    &mib(&w["current_bytes"]),
                    &mib(&w["lent_bytes"]),
                    &mib(&w["borrowed_bytes"]),
                    &mib(&w["rss_bytes"]),
                ]);
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `wv host storage`: the capacities (after setting one, with `set`).
fn host_storage(c: &Client, set: Option<&serde_json::Value>) -> ExitCode {
    let body = set.map(serde_json::Value::to_string);
    let method = if body.is_some() { "PUT" } else { "GET" };
    match api(c, method, "/v1/host/storage", body.as_deref()) {
        Ok(v) if c.json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            let cap = |n: &serde_json::Value| match n.as_u64() {
                Some(0) | None => "none".to_string(),
                Some(n) => format!("{n} IOPS"),
            };
            println!("every device: {}", cap(&v["capacity_iops"]));
            for d in v["device_capacity"].as_array().into_iter().flatten() {
                println!(
                    "{}: {} (its own)",
                    d["device"].as_str().unwrap_or("?"),
                    cap(&d["capacity_iops"])
                );
            }
            let devices = v["devices"].as_array().cloned().unwrap_or_default();
            if let Some(e) = v["devices_error"].as_str() {
                println!("the storage service's devices could not be read: {e}");
                return ExitCode::SUCCESS;
            }
            if devices.is_empty() {
                let why = if v["service"]["pid"].is_null() {
                    "the storage service does not run"
                } else {
                    "the storage service has served no disk yet"
                };
                println!("{why}");
                return ExitCode::SUCCESS;
            }
            let w = devices
                .iter()
                .filter_map(|d| d["device"].as_str().map(str::len))
                .max()
                .unwrap_or(0)
                .max("DEVICE".len());
            println!("{:<w$}  {:>10}  DISKS", "DEVICE", "CAPACITY");
            for d in &devices {
                let disks: Vec<&str> = d["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str())
                    .collect();
                println!(
                    "{:<w$}  {:>10}  {}",
                    d["device"].as_str().unwrap_or("?"),
                    cap(&d["capacity_iops"]),
                    disks.join(" ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn host_status(c: &Client) -> ExitCode {
    match api(c, "GET", "/v1/host", None) {
        Ok(v) if c.json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            for (k, val) in v.as_object().into_iter().flatten() {
                println!("{k}: {val}");
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `wv vm console`: attaches the terminal to a VM's serial console until Ctrl-] (or until the VM
/// ends, or standard input ends when it is not a terminal).
fn console(name: &str, sock: &Path) -> ExitCode {
    use std::io::{Read, Write};
    // A VMM the daemon has just started binds its console socket within milliseconds of
    // `vm start` answering: a console asked for in that window waits for it (up to 5 s), as
    // the daemon's own requests to a new VMM's control socket do.
    let mut tries = 0;
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e)
                if tries < 250
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return fail(2, &format!("cannot attach to {}: {e}", sock.display())),
        }
    };
    // SAFETY: isatty has no preconditions.
    let tty = unsafe { libc::isatty(0) } == 1;
    // SAFETY: termios is plain data; tcgetattr fills it for fd 0, a terminal.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if tty {
        // SAFETY: as above; cfmakeraw and tcsetattr act on that local copy and fd 0.
        unsafe {
            libc::tcgetattr(0, &mut saved);
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        eprint!("[attached to {name}'s console; Ctrl-] detaches]\r\n");
    }
    let mut from_vm = match s.try_clone() {
        Ok(r) => r,
        Err(e) => return fail(2, &format!("console socket: {e}")),
    };
    let printer = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n @ 1..) = from_vm.read(&mut buf) {
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 256];
    let mut stdin = std::io::stdin();
    loop {
        if printer.is_finished() {
            break;
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (data, detach) = match buf[..n].iter().position(|&b| b == 0x1d) {
            Some(i) if tty => (&buf[..i], true),
            _ => (&buf[..n], false),
        };
        if s.write_all(data).is_err() || detach {
            break;
        }
    }
    if !tty {
        // Input ended: keep showing output until the VM ends.
        let _ = printer.join();
    } else {
        let _ = s.shutdown(std::net::Shutdown::Both);
        // SAFETY: restoring the terminal settings saved above.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
        eprint!("\r\n[detached from {name}'s console]\r\n");
    }
    ExitCode::SUCCESS
}

/// `wv host top`: CPU use of every world over one-second intervals.
fn host_top(c: &Client, once: bool) -> ExitCode {
    let mut prev: Option<(std::time::Instant, serde_json::Value)> = None;
    loop {
        let now = std::time::Instant::now();
        let cur = match api(c, "GET", "/v1/stats", None) {
            Ok(v) => v,
            Err(code) => return code,
        };
        if let Some((t0, old)) = &prev {
            let dt = now.duration_since(*t0).as_nanos().max(1) as f64;
            let before = |id: &serde_json::Value, k: &str| {
                old.as_array()
                    .into_iter()
                    .flatten()
                    .find(|w| &w["id"] == id)
                    .and_then(|w| w[k].as_u64())
            };
            let mut rows = Vec::new();
            for w in cur.as_array().into_iter().flatten() {
                let pct = |k: &str| {
                    let b = before(&w["id"], k).unwrap_or(0);
                    100.0 * w[k].as_u64().unwrap_or(0).saturating_sub(b) as f64 / dt
                };
                rows.push(serde_json::json!({
                    "id": w["id"], "name": w["name"], "state": w["state"],
                    "shares": w["shares"], "reservation": w["reservation"],
                    "limit": w["limit"], "entitlement": w["entitlement"],
                    "cpu_percent": pct("cpu_ns"), "ready_percent": pct("ready_ns"),
                    "throttled_percent": pct("throttled_ns"),
                    "served_disks": w.get("served_disks").cloned().unwrap_or_else(|| serde_json::json!([])),
                }));
            }
            if c.json {
                println!("{}", serde_json::Value::from(rows));
            } else {
                if !once {
                    print!("\x1b[H\x1b[2J");
                }
                println!(
                    "{:>4} {:<20} {:<8} {:>6} {:>6} {:>6} {:>9} {:>7} {:>7} {:>7}",
                    "ID",
                    "WORLD",
                    "STATE",
                    "SHARES",
                    "RESV",
                    "LIMIT",
                    "ENTITLED",
                    "CPU%",
                    "READY%",
                    "THROT%"
                );
                for r in &rows {
                    let f = |k: &str| r[k].as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
                    println!(
                        "{:>4} {:<20} {:<8} {:>6} {:>6} {:>6} {:>9} {:>7.1} {:>7.1} {:>7.1}",
                        // The switch world's id is too wide for the column: "sw".
                        match r["id"].as_u64().unwrap_or(0) {
                            wv_host::network::SWITCH_ID => "sw".to_string(),
                            id => id.to_string(),
                        },
                        r["name"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["shares"].as_u64().unwrap_or(0),
                        f("reservation"),
                        f("limit"),
                        f("entitlement"),
                        r["cpu_percent"].as_f64().unwrap_or(0.0),
                        r["ready_percent"].as_f64().unwrap_or(0.0),
                        r["throttled_percent"].as_f64().unwrap_or(0.0),
                    );
                }
                print_served_disks(&rows);
            }
            if once {
                return ExitCode::SUCCESS;
            }
        }
        prev = Some((now, cur));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `wv host top`'s table of the disks the storage service serves: each one's settings (I/Os
/// per second) and the I/Os per second its datastore's dispatcher gave it.
fn print_served_disks(rows: &[serde_json::Value]) {
    let disks: Vec<(&serde_json::Value, &serde_json::Value)> = rows
        .iter()
        .flat_map(|r| {
            r["served_disks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |d| (r, d))
        })
        .collect();
    if disks.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<20} {:<12} {:>7} {:>7} {:>7} {:>8}  DATASTORE",
        "VM", "SERVED DISK", "SHARES", "RESV", "LIMIT", "IOPS"
    );
    for (r, d) in disks {
        let n = |k: &str| match d[k].as_u64() {
            Some(0) | None => "-".to_string(),
            Some(x) => x.to_string(),
        };
        println!(
            "{:<20} {:<12} {:>7} {:>7} {:>7} {:>8.0}  {}",
            r["name"].as_str().unwrap_or("?"),
            d["id"].as_str().unwrap_or("?"),
            n("shares"),
            n("reservation_iops"),
            n("limit_iops"),
            d["iops"].as_f64().unwrap_or(0.0),
            d["device"].as_str().unwrap_or("?"),
        );
    }
}

fn print_vm(v: &serde_json::Value) {
    let s = &v["spec"];
    println!(
        "{:<20} {:<8} {:>5} {:>8} {:>8}  {}",
        s["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        s["vcpus"],
        s["memory"]
            .as_u64()
            .map_or("?".to_string(), wv_config::format_size),
        v["pid"].as_u64().map_or("-".to_string(), |p| p.to_string()),
        v["reason"].as_str().unwrap_or("")
    );
}

fn cmd_net(c: &Client, cmd: NetCmd) -> ExitCode {
    let show = |v: &serde_json::Value, text: &dyn Fn(&serde_json::Value)| {
        if c.json {
            println!("{v}");
        } else {
            text(v);
        }
    };
    let result = match cmd {
        NetCmd::Create(name, uplink, rate) => {
            let mut body = serde_json::json!({ "name": name });
            if let Some(t) = uplink {
                body["uplink"] = t.into();
            }
            if let Some(r) = rate {
                body["uplink_rate"] = r.into();
            }
            api(c, "POST", "/v1/networks", Some(&body.to_string())).map(|v| {
                show(&v, &|v| {
                    println!("created network {name} (uplink {})", uplink_text(v));
                });
            })
        }
        NetCmd::List => api(c, "GET", "/v1/networks", None).map(|v| {
            show(&v, &|v| {
                println!("{:<24} UPLINK", "NAME");
                for n in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {}",
                        n["name"].as_str().unwrap_or(""),
                        uplink_text(n)
                    );
                }
            });
        }),
        NetCmd::Info(name) => api(c, "GET", &format!("/v1/networks/{name}"), None).map(|v| {
            show(&v, &|v| {
                println!(
                    "network {name}: uplink {}, VMs defined on it: {}",
                    uplink_text(v),
                    v["vms"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "none".into())
                );
                println!(
                    "{:<16} {:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9}",
                    "PORT",
                    "VM",
                    "CONN",
                    "TX_FRAMES",
                    "RX_FRAMES",
                    "TX_BYTES",
                    "RX_BYTES",
                    "DROPPED",
                    "ISOLATED",
                    "RX_GSO",
                    "SEGMENTED",
                    "CSUM_FILL"
                );
                for p in v["ports"].as_array().into_iter().flatten() {
                    let n = |k: &str| p[k].as_u64().unwrap_or(0);
                    println!(
                        "{:<16} {:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9}",
                        p["port"].as_str().unwrap_or(""),
                        p["vm"].as_str().unwrap_or("-"),
                        if p["connected"] == true { "yes" } else { "no" },
                        n("tx_frames"),
                        n("rx_frames"),
                        n("tx_bytes"),
                        n("rx_bytes"),
                        n("dropped_malformed") + n("dropped_no_buffer") + n("dropped_bad_offload"),
                        n("dropped_isolated"),
                        n("rx_gso_frames"),
                        n("segmented"),
                        n("csum_filled"),
                    );
                }
            });
        }),
        NetCmd::Delete(name) => api(c, "DELETE", &format!("/v1/networks/{name}"), None).map(|_| {
            if !c.json {
                println!("deleted network {name}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// A network's uplink as `wv net` prints it: `none`, `TAP`, or `TAP at BPS b/s`.
fn uplink_text(n: &serde_json::Value) -> String {
    match (n["uplink"].as_str(), n["uplink_rate"].as_u64()) {
        (None, _) => "none".into(),
        (Some(t), None) => t.into(),
        (Some(t), Some(r)) => format!("{t} at {r} b/s"),
    }
}

/// `wv vm set`'s scheduler settings (PATCH semantics: absent fields stay, `limit: 0` removes
/// the limit).
fn set_sched(c: &Client, name: &str, s: &Sched) -> Result<(), ExitCode> {
    let mut body = serde_json::Map::new();
    if let Some(x) = s.shares {
        body.insert("shares".into(), x.into());
    }
    if let Some(x) = s.reservation {
        body.insert("reservation".into(), x.into());
    }
    if let Some(x) = s.limit {
        body.insert("limit".into(), x.unwrap_or(0.0).into());
    }
    let net = s.net_shares.is_some() || s.net_reservation.is_some() || s.net_limit.is_some();
    if let Some(x) = s.net_shares {
        body.insert("net_shares".into(), x.into());
    }
    if let Some(x) = s.net_reservation {
        body.insert("net_reservation".into(), x.into());
    }
    if let Some(x) = s.net_limit {
        body.insert("net_limit".into(), x.into());
    }
    let disk =
        s.disk_shares.is_some() || s.disk_reservation_iops.is_some() || s.disk_limit_iops.is_some();
    if let Some(x) = s.disk_shares {
        body.insert("disk_shares".into(), x.into());
    }
    if let Some(x) = s.disk_reservation_iops {
        body.insert("disk_reservation_iops".into(), x.into());
    }
    if let Some(x) = s.disk_limit_iops {
        body.insert("disk_limit_iops".into(), x.into());
    }
    let body = serde_json::Value::from(body).to_string();
    api(c, "PATCH", &format!("/v1/vms/{name}"), Some(&body)).map(|v| {
        if c.json {
            println!("{v}");
        } else {
            let s = &v["spec"];
            println!(
                "VM {name}: shares {} reservation {} limit {}",
                s["shares"],
                s["reservation"],
                s["limit"]
                    .as_f64()
                    .map_or("none".to_string(), |l| l.to_string())
            );
            if net {
                let bps = |v: &serde_json::Value| {
                    v.as_u64().map_or("none".into(), |b| format!("{b} b/s"))
                };
                println!(
                    "VM {name}: network shares {} reservation {} limit {}",
                    s["net_shares"].as_u64().unwrap_or(1000),
                    bps(&s["net_reservation"]),
                    bps(&s["net_limit"])
                );
            }
            if disk {
                let iops = |v: &serde_json::Value| {
                    v.as_u64().map_or("none".into(), |n| format!("{n} IOPS"))
                };
                println!(
                    "VM {name}: disk shares {} reservation {} limit {}",
                    s["disk_shares"].as_u64().unwrap_or(1000),
                    iops(&s["disk_reservation_iops"]),
                    iops(&s["disk_limit_iops"])
                );
                let served = s["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|d| d["via"] == "storage")
                    .count();
                if served == 0 {
                    println!(
                        "VM {name}: note: disk shares apply to the disks the storage service serves (via=storage) and it has none in its definition"
                    );
                }
            }
        }
    })
}

/// A JSON byte count as a size (`512M`), `?` when absent.
fn size_of(v: &serde_json::Value) -> String {
    v.as_u64().map_or("?".into(), wv_config::format_size)
}

fn cmd_vm(c: &Client, cmd: VmCmd) -> ExitCode {
    let result = match cmd {
        VmCmd::List => api(c, "GET", "/v1/vms", None).map(|v| {
            if c.json {
                println!("{v}");
            } else {
                println!(
                    "{:<20} {:<8} {:>5} {:>8} {:>8}  REASON",
                    "NAME", "STATE", "VCPUS", "MEMORY", "PID"
                );
                for vm in v.as_array().into_iter().flatten() {
                    print_vm(vm);
                }
            }
        }),
        VmCmd::Create(spec) => {
            let body = match serde_json::to_string(&spec) {
                Ok(b) => b,
                Err(e) => return fail(wv_vmm::error::STATUS_INTERNAL, &e.to_string()),
            };
            api(c, "POST", "/v1/vms", Some(&body)).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!("created VM {} (id {})", spec.name, v["id"]);
                }
            })
        }
        VmCmd::Set(name, s, target) => {
            let sched = if s == Sched::default() {
                Ok(())
            } else {
                set_sched(c, &name, &s)
            };
            sched.and_then(|()| match target {
                None => Ok(()),
                Some(t) => {
                    let body = serde_json::json!({ "memory_target": t }).to_string();
                    api(c, "PUT", &format!("/v1/vms/{name}/balloon"), Some(&body)).map(|v| {
                        if c.json {
                            println!("{v}");
                        } else {
                            println!(
                                "VM {name}: memory target {} (now {}; balloon asked to take {})",
                                size_of(&v["memory_target_bytes"]),
                                size_of(&v["current_bytes"]),
                                size_of(&v["balloon"]["target_bytes"]),
                            );
                        }
                    })
                }
            })
        }
        VmCmd::Named("stats", name) => {
            api(c, "GET", &format!("/v1/vms/{name}/stats"), None).map(|v| {
                if c.json {
                    println!("{v}");
                    return;
                }
                let ms = |x: &serde_json::Value| x.as_u64().unwrap_or(0) as f64 / 1e6;
                println!(
                    "VM {name}: {} shares {} reservation {} limit {} entitled {:.2} CPUs",
                    v["state"].as_str().unwrap_or("?"),
                    v["shares"],
                    v["reservation"],
                    v["limit"]
                        .as_f64()
                        .map_or("none".to_string(), |l| l.to_string()),
                    v["entitlement"].as_f64().unwrap_or(0.0)
                );
                println!(
                    "cpu {:.1} ms  ready {:.1} ms  throttled {:.1} ms",
                    ms(&v["cpu_ns"]),
                    ms(&v["ready_ns"]),
                    ms(&v["throttled_ns"])
                );
                println!(
                    "{:>8} {:<16} {:>12} {:>12}",
                    "TID", "THREAD", "CPU ms", "READY ms"
                );
                for t in v["threads"].as_array().into_iter().flatten() {
                    println!(
                        "{:>8} {:<16} {:>12.1} {:>12.1}",
                        t["tid"].as_u64().unwrap_or(0),
                        t["name"].as_str().unwrap_or("?"),
                        ms(&t["cpu_ns"]),
                        ms(&t["ready_ns"])
                    );
                }
            })
        }
        VmCmd::Named("console", name) => {
            return match api(c, "GET", &format!("/v1/vms/{name}"), None) {
                Ok(v) => match v["console"].as_str() {
                    Some(sock) => console(&name, Path::new(sock)),
                    None => fail(1, &format!("VM '{name}' is not running: no console")),
                },
                Err(code) => code,
            };
        }
        VmCmd::Snapshot(name, snap, raw) => {
            let body = serde_json::json!({ "snapshot": snap, "allow_raw_disk": raw }).to_string();
            api(c, "POST", &format!("/v1/vms/{name}/snapshot"), Some(&body)).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!(
                        "snapshot {snap} of VM {name}: {} MiB of memory written, {:.0} ms",
                        v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                        v["duration_ms"].as_f64().unwrap_or(0.0)
                    );
                }
            })
        }
        VmCmd::DeviceAdd(name, device) => {
            let body = device.to_string();
            api(c, "POST", &format!("/v1/vms/{name}/devices"), Some(&body)).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!("{}: slot {}", v["id"].as_str().unwrap_or("?"), v["slot"]);
                }
            })
        }
        VmCmd::DeviceRemove(name, dev) => {
            api(c, "DELETE", &format!("/v1/vms/{name}/devices/{dev}"), None).map(|_| ())
        }
        VmCmd::Device(name, dev, path, capture) => {
            let body = serde_json::json!({ "path": path, "capture": capture }).to_string();
            api(
                c,
                "PUT",
                &format!("/v1/vms/{name}/devices/{dev}/path"),
                Some(&body),
            )
            .map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!(
                        "VM {name} device {dev}: {} (queues stood still {} us){}",
                        v["path"].as_str().unwrap_or("?"),
                        v["last_pause_us"].as_u64().unwrap_or(0),
                        v["capture"]
                            .as_str()
                            .map(|f| format!(", writing {f}"))
                            .unwrap_or_default()
                    );
                }
            })
        }
        VmCmd::Restore(name, snap) => {
            let body = serde_json::json!({ "snapshot": snap }).to_string();
            api(c, "POST", &format!("/v1/vms/{name}/restore"), Some(&body)).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    print_vm(&v);
                }
            })
        }
        VmCmd::Clone(snap, name, count) => {
            let body = serde_json::json!({ "name": name, "count": count }).to_string();
            api(
                c,
                "POST",
                &format!("/v1/snapshots/{snap}/clone"),
                Some(&body),
            )
            .map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    for vm in v.as_array().into_iter().flatten() {
                        print_vm(vm);
                    }
                }
            })
        }
        VmCmd::Migrate(mig) => {
            let mut body = serde_json::json!({ "to": mig.to, "token": mig.token });
            if let Some(d) = mig.downtime_ms {
                body["downtime_ms"] = d.into();
            }
            if mig.copy_disks {
                body["copy_disks"] = true.into();
            }
            if let Some(d) = &mig.datastore {
                body["datastore"] = d.as_str().into();
            }
            let name = &mig.name;
            api(
                c,
                "POST",
                &format!("/v1/vms/{name}/migrate"),
                Some(&body.to_string()),
            )
            .map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!(
                        "VM {name} migrated to {}: {} MiB sent in {:.0} ms, paused {:.0} ms; there it is {}",
                        mig.to,
                        v["bytes"].as_u64().unwrap_or(0) >> 20,
                        v["total_ms"].as_f64().unwrap_or(0.0),
                        v["downtime_ms"].as_f64().unwrap_or(0.0),
                        v["target"]["state"].as_str().unwrap_or("unknown")
                    );
                }
            })
        }
        VmCmd::Snapshots => api(c, "GET", "/v1/snapshots", None).map(|v| {
            if c.json {
                println!("{v}");
                return;
            }
            println!(
                "{:<20} {:<20} {:>8} {:>10}",
                "NAME", "VM", "MEMORY", "WRITTEN"
            );
            for s in v.as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<20} {:>8} {:>9}M",
                    s["name"].as_str().unwrap_or("?"),
                    s["vm"].as_str().unwrap_or("?"),
                    wv_config::format_size(s["config"]["memory"].as_u64().unwrap_or(0)),
                    s["memory_bytes"].as_u64().unwrap_or(0) >> 20
                );
            }
        }),
        VmCmd::DeleteSnapshot(snap) => api(c, "DELETE", &format!("/v1/snapshots/{snap}"), None)
            .map(|_| {
                if !c.json {
                    println!("deleted snapshot {snap}");
                }
            }),
        VmCmd::Named("info", name) => {
            api(c, "GET", &format!("/v1/vms/{name}"), None).map(|mut v| {
                // A running VM with a balloon: its memory target and current memory too.
                let live = matches!(v["state"].as_str(), Some("running" | "paused"));
                // Read quietly: a VM whose guest is just ending has no balloon to ask (its
                // VMM's socket goes), and its info is still shown, without that line.
                let balloon = if live && v["spec"]["balloon"] == true {
                    let path = format!("/v1/vms/{name}/balloon");
                    wv_host::http::request(&c.socket, "GET", &path, None)
                        .ok()
                        .filter(|(s, _)| *s == 200)
                        .and_then(|(_, b)| serde_json::from_str(&b).ok())
                } else {
                    None
                };
                if c.json {
                    if let Some(b) = balloon {
                        v["balloon"] = b;
                    }
                    println!("{v}");
                    return;
                }
                print_vm(&v);
                if let Some(b) = balloon {
                    println!(
                        "memory target {}, current {} (balloon {}, host RSS of its VMM {})",
                        size_of(&b["memory_target_bytes"]),
                        size_of(&b["current_bytes"]),
                        size_of(&b["balloon"]["actual_bytes"]),
                        size_of(&b["balloon"]["vmm_rss_bytes"]),
                    );
                }
                if v["memory"].is_object() {
                    let m = &v["memory"];
                    println!(
                        "lending: shares {}, active {}, target {}, current {}, lent {}, borrowed {}",
                        m["shares"],
                        m["active_fraction"]
                            .as_f64()
                            .map_or_else(|| "-".into(), |f| format!("{:.0}%", f * 100.0)),
                        size_of(&m["target_bytes"]),
                        size_of(&m["current_bytes"]),
                        size_of(&m["lent_bytes"]),
                        size_of(&m["borrowed_bytes"]),
                    );
                }
            })
        }
        VmCmd::Named(verb, name) => {
            let (method, path) = match verb {
                "info" => ("GET", format!("/v1/vms/{name}")),
                "delete" => ("DELETE", format!("/v1/vms/{name}")),
                _ => ("POST", format!("/v1/vms/{name}/{verb}")),
            };
            api(c, method, &path, None).map(|v| {
                if c.json {
                    println!("{v}");
                } else if verb == "delete" {
                    println!("deleted VM {name}");
                } else {
                    print_vm(&v);
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
