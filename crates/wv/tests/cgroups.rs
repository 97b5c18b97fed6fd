//! The daemon's cgroups through the real daemon on the host's cgroup hierarchy: a daemon
//! stopped by SIGTERM leaves no group behind, a new daemon removes what a killed one left (its
//! own state directory's groups and those of any other dead daemon), and a VM restarted right
//! after it stopped starts (the old run's group removal never races the new run's placement).
//!
//! The daemons here build their groups under a private base (`WV_CGROUP_ROOT`), so that their
//! clean-up of dead daemons' groups never meets the groups of another test binary's daemons.
//! Needs root and a cgroup hierarchy with the `cpu` controller (v1 `cpu` or v2).

mod common;
use common::daemon::Daemon;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use wv_host::cgroup::ROOT_ENV;

/// The private base of this test binary's daemons: a group under the host's cgroup hierarchy
/// that has the `cpu` controller, named after this process, which the daemons find through
/// `WV_CGROUP_ROOT`. It exists while a test holds a [`Base`]; the last one removes it.
/// The tests' base group, held for one test at a time: every daemon started here removes the
/// groups of daemons that are gone, so a test that kills a daemon and then looks at what it
/// left must not run beside another that starts one (which CI once saw remove the killed
/// daemon's groups first).
struct Base(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

static USERS: Mutex<usize> = Mutex::new(0);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn base_path() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let v1 = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu")).then(|| PathBuf::from(f[1]))
        });
        let v2 = || {
            mounts.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let m = PathBuf::from(f[1]);
                let ctl = std::fs::read_to_string(m.join("cgroup.controllers")).unwrap_or_default();
                (f[2] == "cgroup2" && ctl.split_whitespace().any(|c| c == "cpu")).then_some(m)
            })
        };
        let mount = v1
            .or_else(v2)
            .expect("this test needs a cgroup hierarchy with the cpu controller");
        if mount.join("cgroup.subtree_control").exists() {
            std::fs::write(mount.join("cgroup.subtree_control"), "+cpu").unwrap();
        }
        let b = mount.join(format!("wv-test-cgroups-{}", std::process::id()));
        std::env::set_var(ROOT_ENV, &b);
        b
    })
}

impl Base {
    fn enter() -> Base {
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = USERS.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(base_path()).expect("creating a cgroup (run as root)");
        *n += 1;
        Base(one)
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let mut n = USERS.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            // Whatever a failed test's daemons left (a group holding no process goes).
            rmdir_tree(base_path());
        }
    }
}

fn rmdir_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The daemon's own group, from `wv host status`.
fn group_of(d: &Daemon) -> PathBuf {
    let host = d.json(&["host", "status"]);
    let s = host["scheduler"].as_str().unwrap();
    assert!(s.starts_with("cgroup"), "no scheduler: {host}");
    let root = PathBuf::from(s.rsplit(' ').next().unwrap());
    assert!(
        root.starts_with(base_path()),
        "{ROOT_ENV} not followed: {host}"
    );
    root
}

/// Whether a thread of process `pid` is in the cgroup directory `dir`.
fn holds(dir: &Path, pid: u32) -> bool {
    ["tasks", "cgroup.threads", "cgroup.procs"].iter().any(|f| {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim() == pid.to_string())
    })
}

/// Waits (up to 10 s) until `dir` is gone.
fn gone(dir: &Path) -> bool {
    let t = Instant::now();
    while dir.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn a_daemon_stopped_by_sigterm_leaves_no_group() {
    let _base = Base::enter();
    let dir = TempDir::new("cg-term");
    let d = Daemon::start(&dir);
    let root = group_of(&d);
    assert!(
        holds(&root.join("management"), d.pid()) || holds(&root.join("system/management"), d.pid())
    );
    d.stop();
    // The daemon removed its groups before it ended: nothing to wait for.
    assert!(!root.exists(), "{} remains after SIGTERM", root.display());
}

#[test]
fn a_new_daemon_removes_what_a_killed_one_left() {
    let _base = Base::enter();
    // A daemon killed with SIGKILL, with the group of a world whose VMM has ended since.
    let dir_a = TempDir::new("cg-kill-a");
    let a = Daemon::start(&dir_a);
    let root_a = group_of(&a);
    std::fs::create_dir(root_a.join("world-77")).unwrap();
    drop(a); // SIGKILL
    assert!(root_a.join("world-77").exists());

    // A daemon for the same state directory removes its predecessor's world groups.
    let a2 = Daemon::start(&dir_a);
    assert_eq!(group_of(&a2), root_a);
    assert!(
        gone(&root_a.join("world-77")),
        "the killed daemon's world group remains"
    );
    drop(a2); // SIGKILL again: its groups stay behind, for another daemon to find.
    assert!(root_a.exists());

    // A daemon for another state directory removes the groups of every daemon that is gone,
    // and leaves those of a live one alone.
    let dir_live = TempDir::new("cg-kill-live");
    let live = Daemon::start(&dir_live);
    let root_live = group_of(&live);
    let dir_b = TempDir::new("cg-kill-b");
    let b = Daemon::start(&dir_b);
    let root_b = group_of(&b);
    assert!(!root_a.exists(), "{} remains", root_a.display());
    assert!(root_live.exists() && root_b.exists());
    assert!(
        holds(&root_live.join("management"), live.pid())
            || holds(&root_live.join("system/management"), live.pid())
    );
    live.stop();
    b.stop();
    assert!(!root_live.exists() && !root_b.exists());
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_quick_restart_starts() {
    need_kvm();
    let _base = Base::enter();
    let dir = TempDir::new("cg-restart");
    let d = Daemon::start(&dir);
    let root = group_of(&d);
    let r = d.wv(&[
        "vm",
        "create",
        "q",
        "--memory",
        "32M",
        "--cmdline",
        "probe.tests=hang",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    // Stop answers once the VMM is reaped, which is when its group's removal is queued; the
    // next start then places a new VMM in a group of the same name at once.
    for i in 0..40 {
        let (s, body) = d.raw(b"POST /v1/vms/q/start HTTP/1.1\r\n\r\n");
        assert_eq!(s, 200, "start {i}: {body}");
        let (s, body) = d.raw(b"POST /v1/vms/q/stop HTTP/1.1\r\n\r\n");
        assert_eq!(s, 200, "stop {i}: {body}");
    }
    let (s, body) = d.raw(b"POST /v1/vms/q/start HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pid = u32::try_from(v["pid"].as_u64().unwrap()).unwrap();
    // The last run stays in its world's group (no removal queued earlier takes it away).
    let id = v["id"].as_u64().unwrap();
    let world = root.join(format!("world-{id}"));
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        assert!(holds(&world, pid), "the VMM left {}", world.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, body) = d.raw(b"POST /v1/vms/q/stop HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200, "{body}");
    assert!(gone(&world), "{} remains after stop", world.display());
    d.stop();
}
