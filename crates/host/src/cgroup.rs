//! The daemon's cgroups: which hierarchy the host offers (the cgroup v1 `cpu` controller or the
//! unified cgroup v2 hierarchy), the daemon's groups in it, placing processes and threads,
//! writing weights and limits, and removing every group again: a world's once its VMM has gone,
//! the daemon's own when SIGTERM or SIGINT stops it, and whatever a dead daemon left behind.
//!
//! Layout under the base (`WV_CGROUP_ROOT` if set, else the mount), for the daemon of one state
//! directory (`<tag>`, see [`crate::api`]):
//!
//! | v1 (`cpu` controller) | v2 (unified) |
//! |---|---|
//! | `worldvisor/<tag>/management` | `worldvisor/<tag>/system/management` (threaded) |
//! | `worldvisor/<tag>/helper` | `worldvisor/<tag>/system/helper` (threaded) |
//! | `worldvisor/<tag>/world-N` | `worldvisor/<tag>/world-N` |
//! | `worldvisor/<tag>/switch` | `worldvisor/<tag>/switch` (the switch world, [`crate::network`]) |
//! | `worldvisor/<tag>/storage` | `worldvisor/<tag>/storage` (the storage world, [`crate::storage`]) |
//!
//! v1 places single threads anywhere; v2 only inside a threaded subtree, hence `system`, the
//! daemon's own domain, whose two threaded children split its threads. Weights are `cpu.shares`
//! (1024 per CPU) on v1 and `cpu.weight` (100 per CPU, the default of one process) on v2;
//! limits are `cpu.cfs_quota_us`/`cpu.cfs_period_us` on v1 and `cpu.max` on v2. The scheduler
//! confines nothing to CPU sets, so `cpuset.cpus` is never written.
//!
//! A daemon is alive while a thread of it sits in its management group. Every daemon removes,
//! when it starts, the groups of dead daemons (all of a dead tag's groups that hold no
//! process: a VMM that outlived its daemon keeps its world's group, and its limit, until it
//! ends) and the stale world groups of its own tag; it removes its own groups when stopped by
//! SIGTERM or SIGINT or `wv host shutdown` ([`crate::shutdown`]; after moving itself back where
//! it started). Creating and removing groups
//! across daemons is serialised by an advisory lock (`flock`) on the hierarchy's mount.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Environment variable naming the group under which the daemon builds `worldvisor/` (a v1
/// `cpu` hierarchy or a v2 hierarchy, or a group inside one), instead of the mount it finds.
pub const ROOT_ENV: &str = "WV_CGROUP_ROOT";

/// The cgroup interface the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1, the `cpu` controller's own hierarchy.
    V1,
    /// The unified cgroup v2 hierarchy.
    V2,
}

/// A cgroup hierarchy and where in it the daemon builds its groups.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    /// v1 or v2.
    pub version: Version,
    /// Where the hierarchy is mounted.
    pub mount: PathBuf,
    /// The group of the hierarchy that is the mount's root (`/` unless mounted from inside).
    pub mount_root: PathBuf,
    /// The group under which `worldvisor/` goes.
    pub base: PathBuf,
    /// Whether the `cpu` controller is there (always on v1; listed in `cgroup.controllers` on
    /// v2).
    pub cpu: bool,
}

/// One line of `/proc/self/mountinfo`: (mount point, root of the mount, fs type, super options).
fn mounts() -> Vec<(PathBuf, PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some((
                PathBuf::from(unescape(pre.get(4)?)),
                PathBuf::from(unescape(pre.get(3)?)),
                (*post.first()?).to_string(),
                (*post.get(2).unwrap_or(&"")).to_string(),
            ))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn has_v1_cpu(options: &str) -> bool {
    options.split(',').any(|o| o == "cpu")
}

fn v2_controllers(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
}

impl Hierarchy {
    /// The hierarchy the daemon uses: the one `WV_CGROUP_ROOT` names, else the v1 `cpu`
    /// controller if the host mounts it, else a v2 hierarchy offering the `cpu` controller.
    pub fn detect() -> Result<Hierarchy, String> {
        if let Some(p) = std::env::var_os(ROOT_ENV) {
            return Hierarchy::at(Path::new(&p)).map_err(|e| format!("{ROOT_ENV}: {e}"));
        }
        let all = mounts();
        if let Some((m, r, _, _)) = all
            .iter()
            .find(|(_, _, t, o)| t == "cgroup" && has_v1_cpu(o))
        {
            return Ok(Hierarchy {
                version: Version::V1,
                mount: m.clone(),
                mount_root: r.clone(),
                base: m.clone(),
                cpu: true,
            });
        }
        let v2: Vec<_> = all.iter().filter(|(_, _, t, _)| t == "cgroup2").collect();
        if let Some((m, r, _, _)) = v2
            .iter()
            .find(|(m, ..)| v2_controllers(m).split_whitespace().any(|c| c == "cpu"))
        {
            return Ok(Hierarchy {
                version: Version::V2,
                mount: m.clone(),
                mount_root: r.clone(),
                base: m.clone(),
                cpu: true,
            });
        }
        match v2.first() {
            Some((m, ..)) => Err(format!(
                "no cgroup v1 'cpu' controller is mounted and the cgroup v2 hierarchy at {} offers no 'cpu' controller (it offers: {})",
                m.display(),
                v2_controllers(m).trim()
            )),
            None => Err("no cgroup v1 'cpu' controller and no cgroup v2 hierarchy is mounted".into()),
        }
    }

    /// The hierarchy containing the existing group `base`, whose `worldvisor/` the daemon
    /// then uses (v2 without the `cpu` controller included: see [`Cgroups::open_in`]).
    pub fn at(base: &Path) -> Result<Hierarchy, String> {
        let base = std::fs::canonicalize(base).map_err(|e| format!("{}: {e}", base.display()))?;
        let (m, r, t, o) = mounts()
            .into_iter()
            .filter(|(m, _, t, _)| (t == "cgroup" || t == "cgroup2") && base.starts_with(m))
            .max_by_key(|(m, ..)| m.as_os_str().len())
            .ok_or_else(|| format!("{} is not in a cgroup hierarchy", base.display()))?;
        let version = if t == "cgroup2" {
            Version::V2
        } else if has_v1_cpu(&o) {
            Version::V1
        } else {
            return Err(format!(
                "{} is in a cgroup v1 hierarchy without the 'cpu' controller ({o})",
                base.display()
            ));
        };
        let cpu =
            version == Version::V1 || v2_controllers(&base).split_whitespace().any(|c| c == "cpu");
        Ok(Hierarchy {
            version,
            mount: m,
            mount_root: r,
            base,
            cpu,
        })
    }

    /// The group this process is in, in this hierarchy (from `/proc/self/cgroup`).
    fn own_group(&self) -> Option<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, ctl, path) = (f.next()?, f.next()?, f.next()?);
            let ours = match self.version {
                Version::V1 => ctl.split(',').any(|c| c == "cpu"),
                Version::V2 => id == "0" && ctl.is_empty(),
            };
            ours.then_some(path)
        })?;
        let rel = Path::new(path).strip_prefix(&self.mount_root).ok()?;
        Some(self.mount.join(rel))
    }

    /// The file listing (and taking) single threads of a group.
    fn threads_file(&self) -> &'static str {
        match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.threads",
        }
    }

    /// The management group relative to a daemon's group.
    fn management(&self) -> PathBuf {
        match self.version {
            Version::V1 => PathBuf::from("management"),
            Version::V2 => PathBuf::from("system/management"),
        }
    }

    /// The helper group relative to a daemon's group.
    fn helper(&self) -> PathBuf {
        match self.version {
            Version::V1 => PathBuf::from("helper"),
            Version::V2 => PathBuf::from("system/helper"),
        }
    }
}

/// The weight of `cpus` CPUs' worth in `version`'s terms, in the kernel's range.
pub fn weight(version: Version, cpus: f64) -> u64 {
    #[allow(clippy::cast_possible_truncation)] // clamped to the kernel's small ranges
    match version {
        Version::V1 => (cpus * 1024.0).round().clamp(2.0, 262_144.0) as u64,
        Version::V2 => (cpus * 100.0).round().clamp(1.0, 10_000.0) as u64,
    }
}

/// A limit of `limit` CPUs (None: none) per period of `period_us`, as `cpu.max` takes it.
pub fn cpu_max(limit: Option<f64>, period_us: u64) -> String {
    match quota(limit, period_us) {
        -1 => format!("max {period_us}"),
        q => format!("{q} {period_us}"),
    }
}

/// The CFS quota (µs, -1 none) of a limit of `limit` CPUs per period of `period_us`.
fn quota(limit: Option<f64>, period_us: u64) -> i64 {
    #[allow(clippy::cast_possible_truncation)] // a few CPUs' worth of µs
    limit.map_or(-1, |l| (l * period_us as f64).round().max(1000.0) as i64)
}

/// The time throttled by a limit, ns, from a `cpu.stat`.
pub fn throttled(version: Version, cpu_stat: &str) -> u64 {
    let (key, scale) = match version {
        Version::V1 => ("throttled_time ", 1),
        Version::V2 => ("throttled_usec ", 1000),
    };
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
        .map_or(0, |v| v.saturating_mul(scale))
}

fn write(path: &Path, v: impl std::fmt::Display) -> Result<(), String> {
    std::fs::write(path, v.to_string()).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn mkdir(d: &Path) -> Result<(), String> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", d.display())),
    }
}

/// Removes `dir` and every group below it that holds no process; what holds one stays.
fn rmdir_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The cgroups the daemon manages. Cheap to clone: clones share one set of groups.
#[derive(Clone)]
pub struct Cgroups {
    inner: Arc<Inner>,
}

struct Inner {
    h: Hierarchy,
    /// The daemon's group: base/worldvisor/<tag>.
    root: PathBuf,
    /// Weight of the `worldvisor` level and the daemon's group.
    top_weight: u64,
    /// Where this process was before [`Cgroups::system`] moved it.
    origin: Option<PathBuf>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Worlds whose group goes once it holds no process.
    pending: BTreeSet<u64>,
    /// Whether the reaper thread runs.
    reaper: bool,
    /// After [`Cgroups::close`]: nothing is created or placed any more.
    closed: bool,
    /// Whether [`Cgroups::system`] moved this process into the daemon's groups.
    placed: bool,
    /// The weight last written to each world's group (the scheduler's loop writes a weight
    /// only when it changes; a group created again starts from the kernel's default).
    weights: std::collections::HashMap<u64, u64>,
}

/// The exclusive lock that serialises creating and removing groups across daemons.
struct HierarchyLock(std::fs::File);

impl HierarchyLock {
    fn take(h: &Hierarchy) -> Result<HierarchyLock, String> {
        let f = std::fs::File::open(&h.mount)
            .map_err(|e| format!("opening {}: {e}", h.mount.display()))?;
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(HierarchyLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("locking {}: {e}", h.mount.display()));
            }
        }
    }
}

impl Drop for HierarchyLock {
    fn drop(&mut self) {
        // Closing the descriptor (when the File drops) releases the lock too; unlock first so
        // that it is released even if another descriptor shares the open file.
        // SAFETY: as in `take`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Cgroups {
    /// Finds the hierarchy ([`Hierarchy::detect`]) and opens `name` (e.g.
    /// `worldvisor/<tag>`) in it for a host of `cpus` CPUs; refuses a hierarchy without the
    /// `cpu` controller, where the scheduler could enforce nothing.
    pub fn open(name: &str, cpus: f64) -> Result<Cgroups, String> {
        let h = Hierarchy::detect()?;
        if !h.cpu {
            return Err(format!(
                "the cgroup v2 hierarchy at {} offers no 'cpu' controller (it offers: {})",
                h.base.display(),
                v2_controllers(&h.base).trim()
            ));
        }
        Cgroups::open_in(h, name, cpus)
    }

    /// Opens `name` in `h`: removes what dead daemons left under `name`'s parent, creates the
    /// groups, and queues the removal of stale world groups under `name`. On a v2 hierarchy
    /// without the `cpu` controller the groups are built all the same (weights and limits
    /// are then refused): what tests can do where only other controllers are free.
    pub fn open_in(h: Hierarchy, name: &str, cpus: f64) -> Result<Cgroups, String> {
        if name.is_empty()
            || !Path::new(name)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(format!("bad cgroup name '{name}'"));
        }
        let root = h.base.join(name);
        // The host kernel owns the machine: worlds as a whole outweigh the other processes
        // (4 default-weight processes per CPU), so reservations hold against them too.
        let top_weight = weight(h.version, 4.0 * cpus);
        let origin = h.own_group().filter(|g| !g.starts_with(&root));
        let cg = Cgroups {
            inner: Arc::new(Inner {
                h,
                root,
                top_weight,
                origin,
                state: Mutex::default(),
                wake: Condvar::new(),
            }),
        };
        {
            let _lock = HierarchyLock::take(&cg.inner.h)?;
            cg.sweep();
            cg.build()?;
        }
        // Stale world groups of this state directory's previous daemon: gone once empty (the
        // worlds re-adopted meanwhile take theirs back in `attach`).
        let mut st = cg.state();
        for e in std::fs::read_dir(&cg.inner.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("world-"))
                .and_then(|n| n.parse().ok())
            {
                st.pending.insert(id);
            }
        }
        drop(st);
        Ok(cg)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the groups of every dead daemon beside this one (under the lock).
    fn sweep(&self) {
        let h = &self.inner.h;
        let Some(parent) = self.inner.root.parent() else {
            return;
        };
        for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let dir = e.path();
            if dir == self.inner.root || !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let threads = std::fs::read_to_string(dir.join(h.management()).join(h.threads_file()))
                .unwrap_or_default();
            if threads.trim().is_empty() {
                rmdir_tree(&dir);
            }
        }
    }

    /// Creates the daemon's groups with their weights (idempotent; under the lock).
    fn build(&self) -> Result<(), String> {
        let i = &*self.inner;
        let (h, v2, cpu) = (&i.h, i.h.version == Version::V2, i.h.cpu);
        // Every level counts: a group competes with its siblings by its own weight, so the
        // intermediate `worldvisor` group needs it as much as the daemon's own.
        let mut level = h.base.clone();
        let rel = i.root.strip_prefix(&h.base).unwrap_or(Path::new(""));
        for part in rel.components() {
            if v2 && cpu {
                write(&level.join("cgroup.subtree_control"), "+cpu")?;
            }
            level.push(part);
            mkdir(&level)?;
            self.set_weight(&level, i.top_weight)?;
        }
        let shares = |s: u32| weight(h.version, f64::from(s) / 1000.0);
        let (m, hp) = (
            shares(crate::helper::MANAGEMENT_SHARES),
            shares(crate::helper::HELPER_SHARES),
        );
        if v2 {
            if cpu {
                write(&i.root.join("cgroup.subtree_control"), "+cpu")?;
            }
            let sys = i.root.join("system");
            mkdir(&sys)?;
            // The system domain competes with the worlds by the weight its two worlds would
            // have as their siblings (as on v1), and splits it between them.
            self.set_weight(&sys, m + hp)?;
            for d in [h.management(), h.helper()] {
                let d = i.root.join(d);
                mkdir(&d)?;
                let ty = d.join("cgroup.type");
                if std::fs::read_to_string(&ty).unwrap_or_default().trim() != "threaded" {
                    write(&ty, "threaded")?;
                }
            }
            if cpu {
                write(&sys.join("cgroup.subtree_control"), "+cpu")?;
            }
        }
        for (d, w) in [(h.management(), m), (h.helper(), hp)] {
            let d = i.root.join(d);
            mkdir(&d)?;
            self.set_weight(&d, w)?;
        }
        Ok(())
    }

    fn set_weight(&self, dir: &Path, w: u64) -> Result<(), String> {
        match (self.inner.h.version, self.inner.h.cpu) {
            (Version::V1, _) => write(&dir.join("cpu.shares"), w),
            (Version::V2, true) => write(&dir.join("cpu.weight"), w),
            (Version::V2, false) => Ok(()),
        }
    }

    fn need_cpu(&self) -> Result<(), String> {
        if self.inner.h.cpu {
            Ok(())
        } else {
            Err(format!(
                "the cgroup v2 hierarchy at {} offers no 'cpu' controller",
                self.inner.h.base.display()
            ))
        }
    }

    /// Creates the system worlds' groups (see [`crate::helper`]), moves this whole process
    /// into the management group and directs helper threads to theirs. The daemon removes
    /// them at its end ([`Cgroups::close`], from [`crate::shutdown`]).
    pub fn system(&self) -> Result<(), String> {
        let i = &*self.inner;
        let placed = HierarchyLock::take(&i.h).and_then(|_lock| {
            if self.state().closed {
                return Err("the daemon's cgroups are closed".into());
            }
            // Again under the lock: a daemon starting meanwhile may have taken this one for
            // dead (its management group held no thread yet) and removed its groups.
            self.build()?;
            write(
                &i.root.join(i.h.management()).join("cgroup.procs"),
                std::process::id(),
            )?;
            self.state().placed = true;
            Ok(())
        });
        if let Err(e) = placed {
            // Without the scheduler the daemon's groups serve nothing: none is left behind.
            self.close();
            return Err(e);
        }
        crate::helper::set_cgroup(i.root.join(i.h.helper()).join(i.h.threads_file()));
        self.kick();
        Ok(())
    }

    /// The daemon's own group.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Which interface, in a few words, and where ([`crate::api`]'s host status).
    pub fn describe(&self) -> String {
        match self.inner.h.version {
            Version::V1 => format!("cgroup v1 cpu controller at {}", self.root().display()),
            Version::V2 => format!("cgroup v2 cpu controller at {}", self.root().display()),
        }
    }

    /// The hierarchy.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.inner.h
    }

    /// The cgroup of world `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.inner.root.join(format!("world-{id}"))
    }

    /// Creates world `id`'s cgroup and moves every thread of `pid` into it. A removal of the
    /// group still queued from the world's previous run is cancelled: the two never race.
    pub fn attach(&self, id: u64, pid: u32) -> Result<(), String> {
        let mut st = self.state();
        if st.closed {
            return Err("the daemon is stopping".into());
        }
        st.pending.remove(&id);
        st.weights.remove(&id);
        let d = self.dir(id);
        mkdir(&d)?;
        write(&d.join("cgroup.procs"), pid)
    }

    /// World `id`'s group's `cgroup.procs`, open for writing: a process about to become the
    /// world's VMM writes `0` into it before it runs (so that whatever it forks, such as a
    /// jailed VMM's keeper its VMM, starts in the group). [`Cgroups::attach`] still follows.
    pub fn procs_file(&self, id: u64) -> Result<std::fs::File, String> {
        let mut st = self.state();
        if st.closed {
            return Err("the daemon is stopping".into());
        }
        // A removal queued by the last run's end must not take the group from this one.
        st.pending.remove(&id);
        st.weights.remove(&id);
        let d = self.dir(id);
        mkdir(&d)?;
        let p = d.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| format!("opening {}: {e}", p.display()))
    }

    /// The group of system world `name` (`switch`, `storage`: beside the worlds').
    pub fn service_dir(&self, name: &str) -> PathBuf {
        self.inner.root.join(name)
    }

    /// Creates system world `name`'s group with the weight of `shares` (as a world's: 1000
    /// is a CPU's worth when contended) and moves process `pid` into it.
    pub fn attach_service(&self, name: &str, shares: u32, pid: u32) -> Result<(), String> {
        let st = self.state();
        if st.closed {
            return Err("the daemon is stopping".into());
        }
        let d = self.service_dir(name);
        mkdir(&d)?;
        let shares = f64::from(shares) / 1000.0;
        self.set_weight(&d, weight(self.inner.h.version, shares))?;
        write(&d.join("cgroup.procs"), pid)
    }

    /// Sets world `id`'s weight for an entitlement (what the feedback loop adjusts each tick),
    /// writing it only when it differs from the weight last written.
    pub fn weight(&self, id: u64, entitlement: f64) -> Result<(), String> {
        self.need_cpu()?;
        let w = weight(self.inner.h.version, entitlement);
        if self.state().weights.get(&id) == Some(&w) {
            return Ok(());
        }
        self.set_weight(&self.dir(id), w)?;
        self.state().weights.insert(id, w);
        Ok(())
    }

    /// Applies an entitlement and a limit to world `id` (when settings or the running set
    /// change); the weight is written whatever was written before.
    pub fn apply(&self, id: u64, entitlement: f64, limit: Option<f64>) -> Result<(), String> {
        self.state().weights.remove(&id);
        self.weight(id, entitlement)?;
        let d = self.dir(id);
        let period = crate::sched::PERIOD_US;
        // Rewriting the bandwidth settings restarts the kernel's quota accounting, so they are
        // written only when they change.
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        match self.inner.h.version {
            Version::V1 => {
                let quota = quota(limit, period);
                if read("cpu.cfs_period_us").trim() != period.to_string() {
                    write(&d.join("cpu.cfs_period_us"), period)?;
                }
                if read("cpu.cfs_quota_us").trim() != quota.to_string() {
                    write(&d.join("cpu.cfs_quota_us"), quota)?;
                }
            }
            Version::V2 => {
                let max = cpu_max(limit, period);
                if read("cpu.max").trim() != max {
                    write(&d.join("cpu.max"), max)?;
                }
            }
        }
        Ok(())
    }

    /// Removes world `id`'s cgroup once its last process (the VMM's teardown helper outlives
    /// the VMM by a moment) has left, in the background, without giving up; a new
    /// [`Cgroups::attach`] of the world cancels it.
    pub fn remove(&self, id: u64) {
        let mut st = self.state();
        if st.closed {
            return;
        }
        st.pending.insert(id);
        st.weights.remove(&id);
        drop(st);
        self.kick();
    }

    /// Whether removals are still queued (for tests and the shutdown).
    pub fn removing(&self) -> bool {
        !self.state().pending.is_empty()
    }

    /// Starts the reaper thread if it does not run, and wakes it.
    fn kick(&self) {
        let mut st = self.state();
        if !st.reaper && !st.closed && !st.pending.is_empty() {
            let me = self.clone();
            match crate::helper::spawn("cgroup-rm", move || me.reap()) {
                Ok(_) => st.reaper = true,
                Err(e) => eprintln!("wv host: no thread to remove cgroups: {e}"),
            }
        }
        self.inner.wake.notify_all();
    }

    /// Tries to remove every queued group; those that still hold a process stay queued.
    fn try_pending(&self, st: &mut State) {
        st.pending.retain(|&id| {
            let d = self.dir(id);
            match std::fs::remove_dir(&d) {
                Ok(()) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
                Err(e) => {
                    eprintln!("wv host: removing {}: {e}", d.display());
                    false
                }
            }
        });
    }

    /// The reaper: retries the queued removals while any is queued (every 50 ms, backing off
    /// to 1 s while nothing goes: a group can hold a process that outlived its daemon for a
    /// long time), until closed.
    fn reap(&self) {
        let mut st = self.state();
        let mut delay = Duration::from_millis(50);
        loop {
            if st.closed {
                st.reaper = false;
                return;
            }
            let before = st.pending.len();
            self.try_pending(&mut st);
            if st.pending.len() < before {
                delay = Duration::from_millis(50);
            }
            st = if st.pending.is_empty() {
                delay = Duration::from_millis(50);
                self.inner.wake.wait(st).unwrap_or_else(|p| p.into_inner())
            } else {
                let (st, timeout) = self
                    .inner
                    .wake
                    .wait_timeout(st, delay)
                    .unwrap_or_else(|p| p.into_inner());
                if timeout.timed_out() {
                    delay = (delay * 2).min(Duration::from_secs(1));
                } else {
                    // Woken by a new removal: its group may go soon.
                    delay = Duration::from_millis(50);
                }
                st
            };
        }
    }

    /// Removes the daemon's groups: moves this process back to the group it started in,
    /// waits (up to 2 s) for the queued world removals, then removes every group of the
    /// daemon that holds no process (a VMM still running keeps its world's group and its
    /// limit; the next daemon re-adopts it or, once it has ended, removes it), and
    /// `worldvisor/` if no other daemon uses it. Nothing is created or placed afterwards.
    pub fn close(&self) {
        let i = &*self.inner;
        let lock = HierarchyLock::take(&i.h);
        let placed = {
            let mut st = self.state();
            st.closed = true;
            st.placed
        };
        i.wake.notify_all();
        crate::helper::clear_cgroup();
        if placed {
            // Back where it started (else to the hierarchy's root, which takes any process).
            let back = i
                .origin
                .iter()
                .chain([&i.h.mount])
                .any(|g| write(&g.join("cgroup.procs"), std::process::id()).is_ok());
            if !back {
                eprintln!(
                    "wv host: cannot leave the daemon's cgroup for {}",
                    i.h.mount.display()
                );
            }
        }
        let t = Instant::now();
        loop {
            let mut st = self.state();
            self.try_pending(&mut st);
            if st.pending.is_empty() || t.elapsed() > Duration::from_secs(2) {
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(10));
        }
        rmdir_tree(&i.root);
        // The levels above, up to the base, if no other daemon uses them.
        let mut up = i.root.parent();
        while let Some(d) = up.filter(|d| d.starts_with(&i.h.base) && *d != i.h.base) {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            up = d.parent();
        }
        drop(lock);
    }

    /// Removes the groups of the daemon `name` (as given to [`Cgroups::open`]) that a dead
    /// daemon left, and `worldvisor/` above them if nothing else uses it (`wv host
    /// uninstall`); refused while a daemon lives in them. A group that still holds a process
    /// (a VMM that outlived its daemon) stays, and is said.
    pub fn remove_left(name: &str) -> Result<(), String> {
        let h = Hierarchy::detect()?;
        let root = h.base.join(name);
        if !Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(format!("bad cgroup name '{name}'"));
        }
        if !root.exists() {
            return Ok(());
        }
        let _lock = HierarchyLock::take(&h)?;
        let threads = std::fs::read_to_string(root.join(h.management()).join(h.threads_file()))
            .unwrap_or_default();
        if !threads.trim().is_empty() {
            return Err(format!("a daemon lives in {}", root.display()));
        }
        rmdir_tree(&root);
        let mut up = root.parent();
        while let Some(d) = up.filter(|d| d.starts_with(&h.base) && *d != h.base) {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            up = d.parent();
        }
        if root.exists() {
            return Err(format!(
                "{} still holds a process (a VMM that outlived its daemon)",
                root.display()
            ));
        }
        Ok(())
    }

    /// Time world `id` was throttled by its limit, in ns.
    pub fn throttled_ns(&self, id: u64) -> u64 {
        let s = std::fs::read_to_string(self.dir(id).join("cpu.stat")).unwrap_or_default();
        throttled(self.inner.h.version, &s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_limits_in_each_interface() {
        assert_eq!(weight(Version::V1, 1.0), 1024);
        assert_eq!(weight(Version::V1, 0.0), 2);
        assert_eq!(weight(Version::V1, 1e9), 262_144);
        assert_eq!(weight(Version::V2, 1.0), 100);
        assert_eq!(weight(Version::V2, 1.0 / 3.0), 33);
        assert_eq!(weight(Version::V2, 0.0), 1);
        assert_eq!(weight(Version::V2, 1e9), 10_000);
        assert_eq!(cpu_max(None, 100_000), "max 100000");
        assert_eq!(cpu_max(Some(0.3), 100_000), "30000 100000");
        assert_eq!(cpu_max(Some(0.001), 100_000), "1000 100000");
        assert_eq!(cpu_max(Some(1.5), 100_000), "150000 100000");
    }

    #[test]
    fn throttled_time_in_each_interface() {
        let v1 = "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\n";
        let v2 = "usage_usec 9\nnr_throttled 2\nthrottled_usec 7\nnr_bursts 0\n";
        assert_eq!(throttled(Version::V1, v1), 5000);
        assert_eq!(throttled(Version::V2, v2), 7000);
        assert_eq!(throttled(Version::V2, ""), 0);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn names_stay_below_the_base() {
        let h = Hierarchy {
            version: Version::V2,
            mount: "/nonexistent".into(),
            mount_root: "/".into(),
            base: "/nonexistent".into(),
            cpu: false,
        };
        for bad in ["", "../x", "/abs", "a/../b", "./a"] {
            assert!(Cgroups::open_in(h.clone(), bad, 1.0).is_err(), "{bad}");
        }
    }
}
