//! A host left as it was found (issue 15, item 4): what the daemon and its VMMs can touch
//! outside the state directory (the cgroup tree under the controller it uses, the network
//! links, the mounts, the loop devices, the files under /run, the processes) is the same
//! before the daemon starts and after it is stopped, by SIGTERM, by `wv host shutdown`, and
//! after a SIGKILL followed by a restart and a shutdown, or by `wv host uninstall`; `wv host
//! install` writes a unit `systemd-analyze verify` accepts, and nothing else.
//!
//! The daemon runs in a network namespace of the test's (through `nsenter --net`, which keeps
//! the host's mounts and cgroups), with its cgroups under a private base (`WV_CGROUP_ROOT`),
//! its socket in a folder under /run that does not exist before, its VMs on a TAP made
//! beforehand and on one their VMM creates, one with a disk in a VMKFS datastore on a loop
//! device. On a machine shared with other tests, entries of other tests' namespaces (under
//! /run/netns) and loop devices over other tests' files (`wv-test-*`) are left out of the
//! comparison. Needs root.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test needs root (namespaces, TAPs, loop devices, cgroups)"
    );
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The test's network namespace, removed when dropped.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("wvt-{tag}-{}", std::process::id());
        sh("ip", &["netns", "add", &name]);
        let ns = NetNs(name);
        sh(
            "ip",
            &["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"],
        );
        sh("ip", &["-n", &ns.0, "link", "set", "tap0", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        let dev = sh("losetup", &["-f", "--show", file.to_str().unwrap()]);
        Loop(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A private cgroup base for this test's daemons, removed when dropped.
struct CgroupBase(PathBuf);

impl CgroupBase {
    fn new() -> CgroupBase {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let v1 = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu")).then(|| PathBuf::from(f[1]))
        });
        let v2 = || {
            mounts.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
            })
        };
        let mount = v1.or_else(v2).expect("a cgroup hierarchy");
        let b = mount.join(format!("wv-test-clean-{}", std::process::id()));
        std::fs::create_dir_all(&b).unwrap();
        CgroupBase(b)
    }
}

impl Drop for CgroupBase {
    fn drop(&mut self) {
        fn rm(d: &Path) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm(&e.path());
                }
            }
            let _ = std::fs::remove_dir(d);
        }
        rm(&self.0);
    }
}

/// Everything under `dir`, recursively (paths relative to it; folders end in `/`).
fn tree(dir: &Path, skip: &dyn Fn(&Path) -> bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if skip(&p) {
                continue;
            }
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.insert(format!("{rel}/"));
                todo.push(p);
            } else {
                out.insert(rel);
            }
        }
    }
    out
}

/// What the daemon could leave behind, as sorted lines per kind.
#[derive(Debug, PartialEq)]
struct Snapshot {
    cgroups: BTreeSet<String>,
    links: BTreeSet<String>,
    mounts: BTreeSet<String>,
    loops: BTreeSet<String>,
    run: BTreeSet<String>,
    vmms: BTreeSet<String>,
}

struct Host {
    ns: NetNs,
    cg: CgroupBase,
    dir: TempDir,
    /// The daemon's socket: in a folder under /run made by the daemon.
    run_dir: PathBuf,
    socket: PathBuf,
    state: PathBuf,
}

impl Host {
    fn snapshot(&self) -> Snapshot {
        let ours = |p: &Path| {
            // Other tests' namespaces come and go under /run/netns.
            p.starts_with("/run/netns") && p != Path::new("/run/netns") && !p.ends_with(&self.ns.0)
        };
        let foreign_ns = |l: &&str| l.contains("/run/netns/") && !l.contains(&self.ns.0);
        let foreign_file =
            |l: &&str| l.contains("wv-test-") && !l.contains(self.dir.0.to_str().unwrap());
        let cgroups = tree(&self.cg.0, &|_| false)
            .into_iter()
            .filter(|p| p.ends_with('/'))
            .collect();
        // Names and flags, without the per-boot counters `ip -o link` may not show anyway.
        let links = sh("ip", &["-n", &self.ns.0, "-o", "link"])
            .lines()
            .map(|l| l.split(" link/").next().unwrap_or(l).to_string())
            .collect();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| !foreign_ns(l))
            .map(str::to_string)
            .collect();
        let loops = sh("losetup", &["-a"])
            .lines()
            .filter(|l| !foreign_file(l))
            .map(str::to_string)
            .collect();
        let run = tree(Path::new("/run"), &|p| {
            ours(p) || p.starts_with("/run/user") || p.starts_with("/run/systemd")
        });
        let vmms = vmm_processes(&self.state);
        Snapshot {
            cgroups,
            links,
            mounts,
            loops,
            run,
            vmms,
        }
    }

    /// `wv host` in the namespace, its cgroups under the private base.
    fn start(&self) -> Child {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.0))
            .arg(wv_bin())
            .args(["host", "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .env(wv_host::cgroup::ROOT_ENV, &self.cg.0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the daemon did not come up: {}",
                std::fs::read_to_string(self.dir.path("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// `wv host uninstall --state-dir STATE`, with `--yes` if `yes`.
    fn uninstall(&self, yes: bool) -> Run {
        let state = self.state.to_str().unwrap();
        let mut args = vec!["host", "uninstall", "--state-dir", state];
        if yes {
            args.push("--yes");
        }
        self.wv(&args)
    }

    fn wv(&self, args: &[&str]) -> Run {
        let mut c = Command::new(wv_bin());
        c.args(args)
            .env("WV_SOCKET", &self.socket)
            .env(wv_host::cgroup::ROOT_ENV, &self.cg.0);
        run_cmd(c, Duration::from_secs(120))
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.wv(args);
        assert_eq!(r.status, Some(0), "{args:?}\n{r}");
        r.stdout
    }

    fn state_of(&self, vm: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["vm", "info", vm, "--json"])).unwrap();
        v
    }

    /// Starts both VMs and checks each runs, with its TAPs there.
    fn start_vms(&self) {
        for vm in ["a", "b"] {
            self.ok(&["vm", "start", vm]);
        }
        for vm in ["a", "b"] {
            let t = Instant::now();
            while self.state_of(vm)["state"] != "running" {
                assert!(t.elapsed() < Duration::from_secs(30), "{vm} never ran");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The TAP b's VMM created exists while it runs (it opens it within its start-up).
        let t = Instant::now();
        loop {
            let out = Command::new("ip")
                .args(["-n", &self.ns.0, "link", "show", "wvc0"])
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the VMM never created its TAP: {}",
                std::fs::read_to_string(self.state.join("vms/b/vmm.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            self.state.join("vms/a/api.sock").exists(),
            "a's VMM has its control socket"
        );
    }
}

/// `wv run` processes whose files are in `state`'s VM folders.
/// The VMMs of the daemon on `state`, one per VM: a jailed VMM (the only child of its
/// keeper, with the same command line) counts as its keeper.
fn vmm_processes(state: &Path) -> BTreeSet<String> {
    let vms = state.join("vms");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if text.contains(" run ") && text.contains(vms.to_str().unwrap()) {
            let ppid = std::fs::read_to_string(e.path().join("status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim().to_string()))
                .unwrap_or_default();
            found.push((e.file_name().to_string_lossy().into_owned(), ppid, text));
        }
    }
    let pids: BTreeSet<String> = found.iter().map(|(p, _, _)| p.clone()).collect();
    found
        .into_iter()
        .filter(|(_, ppid, _)| !pids.contains(ppid))
        .map(|(pid, _, text)| format!("{pid} {text}"))
        .collect()
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: signalling the daemon this test started (not yet reaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Waits (bounded) for the child to end; its status.
fn wait(mut child: Child) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the daemon did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the host is as in `before`, giving the kernel up to 5 s to settle what it
/// updates asynchronously (a TAP's operational state follows its carrier through the link
/// watcher, up to a second later).
fn assert_same_soon(h: &Host, before: &Snapshot, when: &str) {
    let t = Instant::now();
    loop {
        let now = h.snapshot();
        if now == *before || t.elapsed() > Duration::from_secs(5) {
            return assert_same(before, &now, when);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_same(before: &Snapshot, after: &Snapshot, when: &str) {
    let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
        a.symmetric_difference(b)
            .map(|l| {
                if a.contains(l) {
                    format!("- {l}")
                } else {
                    format!("+ {l}")
                }
            })
            .collect()
    };
    let parts = [
        ("cgroups", diff(&before.cgroups, &after.cgroups)),
        ("ip link", diff(&before.links, &after.links)),
        ("mounts", diff(&before.mounts, &after.mounts)),
        ("loop devices", diff(&before.loops, &after.loops)),
        ("/run", diff(&before.run, &after.run)),
        ("VMMs", diff(&before.vmms, &after.vmms)),
    ];
    let changed: Vec<String> = parts
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(k, d)| format!("{k}:\n  {}", d.join("\n  ")))
        .collect();
    assert!(
        changed.is_empty(),
        "{when}: the host is not as it was:\n{}",
        changed.join("\n")
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_host_is_left_as_it_was_found() {
    need_kvm();
    root();
    let dir = TempDir::new("clean-host");
    // A VMKFS datastore on a loop device, with a disk for VM a.
    let backing = dir.path("ds.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = Loop::new(&backing);
    let r = wv(&["fs", "mkfs", &dev.0, "--block-size", "64K"]);
    assert_eq!(r.status, Some(0), "{r}");
    let src = dir.file("root.raw", &vec![0u8; 1 << 20]);
    let r = wv(&["fs", "import", &dev.0, "root", src.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r}");
    let run_dir = PathBuf::from(format!("/run/wv-test-clean-{}", std::process::id()));
    let h = Host {
        ns: NetNs::new("clean"),
        cg: CgroupBase::new(),
        socket: run_dir.join("api/wv.sock"),
        run_dir,
        state: dir.path("state"),
        dir,
    };
    assert!(!h.run_dir.exists());
    let before = h.snapshot();

    // 1. SIGTERM, the VMs stopped first (SIGTERM alone leaves VMs running, by design).
    let d = h.start();
    let disk = format!("vmkfs={}:root,id=root", dev.0);
    h.ok(&[
        "vm",
        "create",
        "a",
        "--memory",
        "32M",
        "--net",
        "tap=tap0",
        "--disk",
        &disk,
        "--cmdline",
        "probe.tests=hang",
    ]);
    h.ok(&[
        "vm",
        "create",
        "b",
        "--memory",
        "32M",
        "--net",
        "tap=wvc0",
        "--cmdline",
        "probe.tests=hang",
    ]);
    h.start_vms();
    assert!(h.socket.exists() && h.state.join("traces.json").exists());
    h.ok(&["vm", "stop", "a"]);
    h.ok(&["vm", "stop", "b"]);
    signal(&d, libc::SIGTERM);
    let st = wait(d);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGTERM)
    );
    assert_same_soon(&h, &before, "after SIGTERM");
    assert!(!h.state.join("traces.json").exists());

    // 2. `wv host shutdown` with both VMs running.
    let d = h.start();
    h.start_vms();
    let out = h.ok(&["host", "shutdown"]);
    assert!(out.starts_with("stopped 2 VMs: a, b"), "{out}");
    assert!(wait(d).success());
    assert_same_soon(&h, &before, "after wv host shutdown");
    for vm in ["a", "b"] {
        let worlds: serde_json::Value =
            serde_json::from_slice(&std::fs::read(h.state.join("worlds.json")).unwrap()).unwrap();
        let w = worlds["worlds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["spec"]["name"] == vm)
            .unwrap()
            .clone();
        assert_eq!(w["state"], "stopped", "{w}");
        assert_eq!(w["reason"], "stopped on request", "{w}");
    }

    // 3. SIGKILL with the VMs running: the socket, the daemon's groups and the VMMs stay;
    // uninstall refuses while a VMM runs; a new daemon takes the VMs back, and its shutdown
    // leaves the host as it was.
    let mut d = h.start();
    h.start_vms();
    d.kill().unwrap();
    d.wait().unwrap();
    assert!(
        h.socket.exists(),
        "a killed daemon cannot remove its socket"
    );
    assert_eq!(h.snapshot().vmms.len(), 2);
    let r = h.uninstall(true);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("still runs"), "{r}");
    let d = h.start();
    assert_eq!(h.state_of("a")["state"], "running");
    let out = h.ok(&["host", "shutdown"]);
    assert!(out.starts_with("stopped 2 VMs"), "{out}");
    assert!(wait(d).success());
    assert_same_soon(&h, &before, "after SIGKILL, a restart and a shutdown");

    // 4. SIGKILL with no VM running, then `wv host uninstall`: the leftovers and the state
    // directory go.
    let mut d = h.start();
    let r = h.uninstall(false);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("add --yes"), "no terminal to ask on: {r}");
    let r = h.uninstall(true);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("a daemon runs"), "{r}");
    d.kill().unwrap();
    d.wait().unwrap();
    assert!(h.socket.exists());
    assert_ne!(
        h.snapshot().cgroups,
        before.cgroups,
        "the killed daemon's groups stay"
    );
    let r = h.uninstall(true);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(!h.state.exists(), "the state directory remains");
    assert_same_soon(&h, &before, "after SIGKILL and wv host uninstall");
    // Nothing left to remove: still fine.
    let r = h.uninstall(true);
    assert_eq!(r.status, Some(0), "{r}");
}

#[test]
fn install_writes_a_unit_systemd_accepts_and_nothing_else() {
    let dir = TempDir::new("install");
    let units = dir.path("units");
    std::fs::create_dir(&units).unwrap();
    let r = wv(&[
        "host",
        "install",
        "--unit-dir",
        units.to_str().unwrap(),
        "--state-dir",
        dir.path("my state").to_str().unwrap(),
        "--socket",
        "/run/wv test/wv.sock",
        "--listen",
        "127.0.0.1:7070",
        "--images",
        "/srv/images",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let unit = units.join("worldvisor.service");
    assert_eq!(r.stdout.trim(), format!("wrote {}", unit.display()));
    // Nothing but the unit: no state directory, no socket folder.
    let all: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(all, ["units"], "install made more than the unit");
    assert_eq!(std::fs::read_dir(&units).unwrap().count(), 1);
    assert!(!Path::new("/run/wv test").exists());
    let text = std::fs::read_to_string(&unit).unwrap();
    let exe = std::fs::canonicalize(wv_bin()).unwrap();
    let start = format!(
        "ExecStart={} host --socket \"/run/wv test/wv.sock\" --state-dir \"{}\" --listen 127.0.0.1:7070 --images /srv/images",
        exe.display(),
        dir.path("my state").display()
    );
    assert!(text.contains(&start), "{text}");
    assert!(
        text.contains(&format!(
            "ExecStop=-{} host shutdown --socket \"/run/wv test/wv.sock\"",
            exe.display()
        )),
        "{text}"
    );
    // systemd's own check, which needs no running systemd: no warning at all.
    let verify = |path: &Path| {
        Command::new("systemd-analyze")
            .args(["verify", path.to_str().unwrap()])
            .output()
            .expect("systemd-analyze (Debian package systemd) is needed")
    };
    let out = verify(&unit);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... which does catch a broken unit (so its silence above means something): a bad
    // setting is a warning, a relative ExecStart a fatal error.
    let warned = dir.file(
        "warned.service",
        text.replace("KillMode=process", "KillMode=bogus")
            .as_bytes(),
    );
    let out = verify(&warned);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kill mode"), "{err}");
    let fatal = dir.file(
        "fatal.service",
        text.replace("ExecStart=/", "ExecStart=").as_bytes(),
    );
    let out = verify(&fatal);
    assert!(!out.status.success(), "{out:?}");
    // A bad option is a usage error, and nothing is written.
    let r = wv(&["host", "install", "--unit-dir", "/nonexistent", "--json"]);
    assert_eq!(r.status, Some(200), "{r}");
    let r = wv(&["host", "install", "--unit-dir", "/nonexistent/dir"]);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("cannot write"), "{r}");
}
