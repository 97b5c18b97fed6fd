//! The daemon's cgroups on a real cgroup v2 hierarchy, mounted by this test (a private mount
//! point, unmounted at the end; the groups live under a private base group): the layout with
//! its threaded subtree, per-thread placement of the management and helper worlds, a world's
//! process placement, removal racing quick re-attaches, the removal of a dead daemon's groups
//! while a live daemon's stay, and the clean-up that leaves nothing behind.
//!
//! The `cpu` controller may be taken by a v1 hierarchy (as on the machine this was written
//! on, where only `hugetlb` is free for v2): weights and limits are then refused with a clear
//! error, which is checked; where v2 offers `cpu`, they are written and read back. Needs root.

use std::path::{Path, PathBuf};
mod common;
use common::sleeper;
use std::time::{Duration, Instant};
use wv_host::cgroup::{Cgroups, Hierarchy, Version};

/// A cgroup2 mount of this test; its groups, the mount and the mount point go when dropped.
struct Mount {
    point: PathBuf,
    base: PathBuf,
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

impl Mount {
    fn new() -> Mount {
        let point = std::env::temp_dir().join(format!("wv-cg2-{}", std::process::id()));
        std::fs::create_dir_all(&point).unwrap();
        let (src, fs) = (c"none", c"cgroup2");
        let target = cstr(&point);
        // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting cgroup2 at {} (needs root): {}",
            point.display(),
            std::io::Error::last_os_error()
        );
        let base = point.join(format!("wv-test-v2-{}", std::process::id()));
        let m = Mount { point, base };
        std::fs::create_dir(&m.base).unwrap();
        m
    }

    /// This process's group in the v2 hierarchy, as /proc/self/cgroup names it.
    fn own_group() -> String {
        let s = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string()
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

impl Drop for Mount {
    fn drop(&mut self) {
        // Out of the test's groups (if a failed assertion left this process in them).
        let _ = std::fs::write(
            self.point.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        rmdir_tree(&self.base);
        let target = cstr(&self.point);
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.point);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

fn lists(file: &Path, id: u32) -> bool {
    read(file).lines().any(|l| l.trim() == id.to_string())
}

/// Waits up to 10 s for `cond`.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn mkdirs(base: &Path, dirs: &[&str]) {
    for d in dirs {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
}

#[test]
fn layout_threads_removal_and_clean_up_on_cgroup_v2() {
    let m = Mount::new();
    let origin = Mount::own_group();
    let wv = m.base.join("worldvisor");
    // A dead daemon's groups (its management group holds no thread), one of a live daemon
    // (a process in its management group), and a stale world group of this state directory.
    mkdirs(
        &wv,
        &[
            "dead/system/management",
            "dead/system/helper",
            "dead/world-9",
            "live/system/management",
            "live/world-3",
            "mine/world-5",
        ],
    );
    for d in [
        "dead/system/management",
        "dead/system/helper",
        "live/system/management",
    ] {
        std::fs::write(wv.join(d).join("cgroup.type"), "threaded").unwrap();
    }
    let live = sleeper();
    std::fs::write(
        wv.join("live/system/management/cgroup.procs"),
        live.id().to_string(),
    )
    .unwrap();

    let h = Hierarchy::at(&m.base).unwrap();
    assert_eq!(h.version, Version::V2);
    let cg = Cgroups::open_in(h.clone(), "worldvisor/mine", 2.0).unwrap();
    assert!(cg.describe().starts_with("cgroup v2"), "{}", cg.describe());
    assert!(!wv.join("dead").exists(), "the dead daemon's groups remain");
    assert!(
        wv.join("live/world-3").exists()
            && lists(&wv.join("live/system/management/cgroup.threads"), live.id())
    );

    // The layout: the daemon's own domain with a threaded subtree for its two worlds.
    let root = cg.root().to_path_buf();
    assert_eq!(root, wv.join("mine"));
    assert_eq!(read(&root.join("cgroup.type")), "domain");
    assert_eq!(read(&root.join("system/cgroup.type")), "domain threaded");
    for w in ["management", "helper"] {
        assert_eq!(
            read(&root.join("system").join(w).join("cgroup.type")),
            "threaded"
        );
    }

    // The whole process goes to management; helper threads to helper, one by one.
    cg.system().unwrap();
    let rel = |p: &Path| format!("/{}", p.strip_prefix(&m.point).unwrap().display());
    assert_eq!(Mount::own_group(), rel(&root.join("system/management")));
    let (tx, rx) = std::sync::mpsc::channel();
    wv_host::helper::spawn("probe", move || {
        let s = std::fs::read_to_string("/proc/thread-self/cgroup").unwrap();
        tx.send(
            s.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap()
                .to_string(),
        )
        .unwrap();
    })
    .unwrap()
    .join()
    .unwrap();
    assert_eq!(rx.recv().unwrap(), rel(&root.join("system/helper")));
    assert_eq!(Mount::own_group(), rel(&root.join("system/management")));
    assert!(
        eventually(|| !root.join("world-5").exists()),
        "the stale world group remains"
    );

    // A world: its VMM process in a domain group of its own.
    let mut vmm = sleeper();
    cg.attach(2, vmm.id()).unwrap();
    assert_eq!(read(&cg.dir(2).join("cgroup.type")), "domain");
    assert!(lists(&cg.dir(2).join("cgroup.procs"), vmm.id()));
    if h.cpu {
        cg.apply(2, 0.5, Some(0.3)).unwrap();
        assert_eq!(read(&cg.dir(2).join("cpu.weight")), "50");
        assert_eq!(read(&cg.dir(2).join("cpu.max")), "30000 100000");
        cg.apply(2, 0.5, None).unwrap();
        assert_eq!(read(&cg.dir(2).join("cpu.max")), "max 100000");
    } else {
        eprintln!("NOTE: the cgroup v2 hierarchy here has no cpu controller: cpu.weight and cpu.max are not exercised");
        let e = cg.apply(2, 0.5, Some(0.3)).unwrap_err();
        assert!(e.contains("no 'cpu' controller"), "{e}");
    }
    assert_eq!(cg.throttled_ns(2), 0);

    // Removal queued while the old run's last process is still there, then a quick restart:
    // the new run is placed every time and keeps its group.
    let mut failures = Vec::new();
    for i in 0..300 {
        cg.remove(2);
        drop(vmm);
        vmm = sleeper();
        if let Err(e) = cg.attach(2, vmm.id()) {
            failures.push(format!("{i}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert!(lists(&cg.dir(2).join("cgroup.procs"), vmm.id()));
    drop(vmm);
    cg.remove(2);
    assert!(
        eventually(|| !cg.dir(2).exists()),
        "the world's group remains"
    );

    // Clean-up: the process back where it was, the daemon's groups gone, the live daemon's
    // kept; nothing is created afterwards.
    let straggler = sleeper();
    cg.attach(3, straggler.id()).unwrap();
    cg.close();
    assert_eq!(Mount::own_group(), origin);
    assert!(!root.join("system").exists());
    assert!(
        cg.dir(3).exists(),
        "a world whose process runs keeps its group"
    );
    assert!(cg.attach(4, std::process::id()).is_err());
    drop(straggler);
    // A later daemon removes it, and the rest of the dead tag.
    let next = Cgroups::open_in(h, "worldvisor/next", 2.0).unwrap();
    assert!(!root.exists(), "the closed daemon's leftovers remain");
    next.close();
    assert!(!wv.join("next").exists());
    assert!(wv.join("live").exists());
    drop(live);
    drop(m);
}
