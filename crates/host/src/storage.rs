//! The storage world: one `wv storage` process (crates/storage) that serves the daemon's VMs
//! the disks they ask to have served (`--disk vmkfs=DS:NAME,via=storage`) over vhost-user-blk.
//! It is supervised as a system world ([`crate::service`]: its own cgroup, restarted with a
//! back-off when it dies, every disk of a running VM added to it again), its sockets
//! under `STATE_DIR/st` (mode 0700). It holds each disk's exclusive open (the VMKFS lock and
//! owner record, an image's `flock`) while the disk's VM runs: the disk's owner is the host,
//! its holder a world. A disk is added when its VM starts and deleted when the VM's run ends;
//! the VMM gets only the disk's socket. VMMs reconnect by themselves and hand their rings back
//! from the used index, so a fault in the service takes down neither a VM nor the daemon, and
//! loses no acknowledged write.

use crate::service::{self, Service};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wv_config::DiskConfig;

/// World id of the storage service in the daemon's statistics (the switch's less one).
pub const STORAGE_ID: u64 = crate::network::SWITCH_ID - 1;
/// Shares of the storage world: a CPU's worth when contended, as the switch.
pub const STORAGE_SHARES: u32 = 1000;
/// The folder, in the state directory, of the service's sockets and log.
pub const STORAGE_DIR: &str = "st";
/// Time a VMM that ended has to be seen gone by the service before its disk is let go of
/// anyway (the service refuses `disk del` while a VMM is connected).
const DISCONNECT: Duration = Duration::from_secs(5);

/// The service's name for disk `index` of VM world `id` (what the guest reads with GET_ID).
pub fn disk_name(id: u64, index: usize) -> String {
    format!("{id}-disk{index}")
}

/// How many served disks may be hot-plugged into one run of a VM (its PCI bus has 32 slots).
pub const MAX_HOT_DISKS: usize = 32;

/// The service's name for hot-plugged disk `k` (below [`MAX_HOT_DISKS`]) of VM world `id`.
pub fn hot_disk_name(id: u64, k: usize) -> String {
    format!("{id}-hdisk{k}")
}

/// The socket of the served disk `name` under the service's folder `dir`.
pub fn disk_socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The service's `--disk` text for `d` (`vmkfs=DS:NAME` or `path=IMG`, `readonly=on`).
/// [`crate::world::VmSpec::validate`] has checked that it reads back as written.
pub fn disk_source(d: &DiskConfig) -> String {
    let mut s = match &d.vmkfs {
        Some(n) => format!("vmkfs={}:{n}", d.path.display()),
        None => format!("path={}", d.path.display()),
    };
    if d.readonly {
        s.push_str(",readonly=on");
    }
    s
}

/// The first disk of `c` that the storage service serves, if any.
pub fn served_disk(c: &wv_config::VmConfig) -> Option<&DiskConfig> {
    c.disks
        .iter()
        .find(|d| d.via == wv_config::DiskVia::Storage)
}

/// Why the disk `d` cannot be handed to the service, if it cannot: its paths and name go
/// through the service's `--disk NAME=SPEC` text and its control socket's words.
pub fn check_disk(d: &DiskConfig) -> Result<(), String> {
    let bad = |s: &str| {
        s.chars()
            .any(|c| c == ',' || c.is_whitespace() || c.is_control())
    };
    let path = d.path.to_str().unwrap_or(",");
    if bad(path) {
        return Err(format!(
            "disk {}: a disk served by the storage service needs a path without commas, spaces or control characters ({})",
            d.id,
            d.path.display()
        ));
    }
    if let Some(n) = &d.vmkfs {
        if bad(n) || n.contains(':') {
            return Err(format!(
                "disk {}: a VMKFS disk served by the storage service needs a name without ':', commas, spaces or control characters ('{}')",
                d.id,
                n.escape_debug()
            ));
        }
    }
    if d.vhost_user {
        return Err(format!(
            "disk {}: via=storage and vhost-user exclude each other",
            d.id
        ));
    }
    Ok(())
}

/// Why a disk could not be served.
#[derive(Debug, PartialEq, Eq)]
pub enum AddError {
    /// The service refused it (the disk is locked by another holder, missing, not VMKFS).
    Refused(String),
    /// The service cannot be started or reached.
    Unavailable(String),
}

impl std::fmt::Display for AddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddError::Refused(e) => write!(f, "{e}"),
            AddError::Unavailable(e) => write!(f, "the storage service is unavailable: {e}"),
        }
    }
}

/// A VM's settings in the storage service, for each of its served disks: shares against the
/// other disks of the same device (its VMKFS datastore; raw images share one), a reservation
/// and a limit in I/Os per second (absent: the service's default of 1000 shares, no
/// reservation, no limit). See docs/STORAGE.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskShares {
    /// 1 to [`wv_shares::MAX_SHARES`].
    pub shares: Option<u32>,
    /// I/Os per second it gets whenever it asks for that many.
    pub reservation_iops: Option<u64>,
    /// I/Os per second it never exceeds.
    pub limit_iops: Option<u64>,
}

impl DiskShares {
    /// Whether anything is set.
    pub fn any(&self) -> bool {
        *self != DiskShares::default()
    }

    /// Checks the shares' range and that a reservation is within the limit.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = self.shares {
            if !(1..=wv_shares::MAX_SHARES).contains(&s) {
                return Err(format!("disk_shares {s}: use 1-{}", wv_shares::MAX_SHARES));
            }
        }
        if let (Some(r), Some(l)) = (self.reservation_iops, self.limit_iops) {
            if r > l {
                return Err(format!(
                    "disk_reservation_iops {r} is above the disk_limit_iops {l}"
                ));
            }
        }
        Ok(())
    }

    /// The service's request that sets them on disk `name` (every field, so that one removed
    /// goes back to the default).
    pub fn request(&self, name: &str) -> String {
        format!(
            "disk set {name} shares={} reservation_iops={} limit_iops={}",
            self.shares.unwrap_or(wv_shares::DEFAULT_SHARES),
            self.reservation_iops.unwrap_or(0),
            self.limit_iops.unwrap_or(0)
        )
    }
}

/// What the service should serve: (name, `--disk` source text) per disk, the settings of the
/// disks that have some, and each device's capacity.
#[derive(Default)]
pub struct Wanted {
    disks: Vec<(String, String)>,
    shares: Vec<(String, DiskShares)>,
    /// I/Os per second of each device (`wv host --storage-capacity-iops`; 0: none).
    capacity_iops: u64,
    /// Devices with a capacity of their own (`--storage-capacity-iops DEV=N`, `PUT
    /// /v1/host/storage`): (device as given, I/Os per second).
    device_capacity: Vec<(String, u64)>,
}

/// How many devices the daemon keeps a capacity of their own for.
pub const MAX_DEVICES: usize = 256;

/// `dev` as the service names it: a datastore's canonical path when it resolves, else as
/// given; `raw` as it is.
pub fn canonical_device(dev: &str) -> String {
    if dev == RAW_DEVICE {
        return dev.to_string();
    }
    std::fs::canonicalize(dev).map_or_else(|_| dev.to_string(), |p| p.display().to_string())
}

/// The longest device name the daemon keeps a capacity for.
pub const MAX_DEVICE: usize = 4096;

/// Checks a device name for the service's control line: a datastore's path or `raw`, one word
/// of printable characters (the line is split at white space).
pub fn check_device(dev: &str) -> Result<(), String> {
    if dev.is_empty() || dev.len() > MAX_DEVICE {
        return Err(format!(
            "a device is a datastore's path or {RAW_DEVICE}, 1 to {MAX_DEVICE} bytes"
        ));
    }
    if dev.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "device '{}': no white space or control characters",
            dev.escape_debug()
        ));
    }
    if dev != RAW_DEVICE && !dev.starts_with('/') {
        return Err(format!(
            "device '{}': a datastore's absolute path, or {RAW_DEVICE} for the raw images",
            dev.escape_debug()
        ));
    }
    Ok(())
}

/// The device every raw image shares in the service.
pub const RAW_DEVICE: &str = "raw";

impl service::Wants for Wanted {
    const KIND: service::Kind = service::Kind {
        name: "storage",
        folder: STORAGE_DIR,
        command: "storage",
        fixed_args: &["--take-stale-locks"],
    };

    /// None: a disk on the command line that cannot be opened (its datastore gone while the
    /// service was down) would stop the whole service, and every VM's disks with it.
    fn args(&self) -> Vec<String> {
        if self.capacity_iops == 0 {
            return Vec::new();
        }
        vec!["--capacity-iops".into(), self.capacity_iops.to_string()]
    }

    /// The devices' own capacities, then each disk added and given its settings (if it has
    /// any).
    fn replay(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .device_capacity
            .iter()
            .map(|(d, n)| format!("set capacity_iops={n} device={d}"))
            .collect();
        for (n, s) in &self.disks {
            v.push(format!("disk add {n}={s}"));
            if let Some((_, sh)) = self.shares.iter().find(|(x, _)| x == n) {
                v.push(sh.request(n));
            }
        }
        v
    }

    fn any(&self) -> bool {
        !self.disks.is_empty()
    }
}

/// The storage world's supervisor (a handle: clones share it). It is started with
/// `--take-stale-locks`: the VMKFS owner records a killed service left name a writer that is
/// gone, and the service started next takes those disks again.
pub type Supervisor = Service<Wanted>;

/// What only the storage world does.
impl Service<Wanted> {
    /// Sets what the service serves at the daemon's start (the served disks of the VMs still
    /// running: (name, source)) and starts it if there is any.
    pub fn restore(&self, disks: Vec<(String, String)>, shares: Vec<(String, DiskShares)>) {
        let (capacity_iops, device_capacity) = {
            let st = self.state();
            (st.want.capacity_iops, st.want.device_capacity.clone())
        };
        self.restore_wanted(Wanted {
            disks,
            shares,
            capacity_iops,
            device_capacity,
        });
    }

    /// Sets each device's capacity in I/Os per second (0: none): on the command line of every
    /// service started from now on, and sent to the one running.
    pub fn set_capacity(&self, iops: u64) -> Result<(), String> {
        let mut st = self.state();
        st.want.capacity_iops = iops;
        if !st.running() {
            return Ok(());
        }
        self.request(&format!("set capacity_iops={iops}"))
            .map(|_| ())
    }

    /// Sets device `dev`'s own capacity in I/Os per second ([`check_device`]; 0: none), or
    /// with `None` gives it the default back: kept for every service started from now on, and
    /// sent to the one running.
    pub fn set_device_capacity(&self, dev: &str, iops: Option<u64>) -> Result<(), String> {
        check_device(dev)?;
        // Kept under the name the service gives it (a datastore's canonical path), so that two
        // spellings of one datastore are one entry here as they are there.
        let dev = &canonical_device(dev);
        let mut st = self.state();
        st.want.device_capacity.retain(|(d, _)| d != dev);
        if iops.is_some() && st.want.device_capacity.len() >= MAX_DEVICES {
            return Err(format!(
                "{MAX_DEVICES} devices have a capacity of their own already: give one the default back first"
            ));
        }
        if let Some(n) = iops {
            st.want.device_capacity.push((dev.to_string(), n));
        }
        if !st.running() {
            return Ok(());
        }
        let n = iops.map_or_else(|| "default".to_string(), |n| n.to_string());
        self.request(&format!("set capacity_iops={n} device={dev}"))
            .map(|_| ())
    }

    /// Each device's capacity in I/Os per second (0: none).
    pub fn capacity(&self) -> u64 {
        self.state().want.capacity_iops
    }

    /// The devices with a capacity of their own: (device as given, I/Os per second).
    pub fn device_capacities(&self) -> Vec<(String, u64)> {
        self.state().want.device_capacity.clone()
    }

    /// The running service's devices (`[]` when it does not run): each one's capacity and
    /// disks, as the service has them.
    pub fn devices(&self) -> Result<Vec<serde_json::Value>, String> {
        self.stats("devices")
    }

    /// Sets served disk `name`'s shares, reservation and limit (kept for a restarted service;
    /// sent at once while it runs and serves the disk).
    pub fn set_shares(&self, name: &str, s: &DiskShares) -> Result<(), String> {
        let mut st = self.state();
        st.want.shares.retain(|(n, _)| n != name);
        if s.any() {
            st.want.shares.push((name.into(), *s));
        }
        if !st.running() || !st.want.disks.iter().any(|(n, _)| n == name) {
            // Replayed once it runs (or with the disk).
            return Ok(());
        }
        self.request(&s.request(name)).map(|_| ())
    }

    /// Serves disk `name` from `source` (starting the service first if it does not run); its
    /// socket, bound when this returns. A disk the service cannot open or lock (held by
    /// another VM or process, missing) is [`AddError::Refused`], with the service's reason.
    pub fn add_disk(&self, name: &str, source: &str) -> Result<PathBuf, AddError> {
        let sock = disk_socket(self.dir(), name);
        let mut st = self.state();
        if st.closed() {
            return Err(AddError::Unavailable("the daemon is stopping".into()));
        }
        if let Some((_, s)) = st.want.disks.iter().find(|(n, _)| n == name) {
            // Left by a run whose end was not seen yet: the service has it.
            if s == source && st.running() {
                return Ok(sock);
            }
            st.want.disks.retain(|(n, _)| n != name);
        }
        // Started (if it must be) with what it serves already, then asked for this disk: a
        // disk it cannot take costs only this disk.
        self.ensure(&mut st).map_err(AddError::Unavailable)?;
        let v = self
            .answer(&format!("disk add {name}={source}"))
            .map_err(AddError::Unavailable)?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) if e.contains("already served") => {}
            Some(e) => return Err(AddError::Refused(e.to_string())),
            None => {}
        }
        st.want.disks.push((name.into(), source.into()));
        Ok(sock)
    }

    /// Stops serving disk `name` (its VM's run ended) and releases it. The service refuses
    /// while the VMM is still connected: the VMM has ended, so that is only until the service
    /// has seen its connection close.
    pub fn del_disk(&self, name: &str) {
        let mut st = self.state();
        let before = st.want.disks.len();
        st.want.disks.retain(|(n, _)| n != name);
        st.want.shares.retain(|(n, _)| n != name);
        if st.want.disks.len() == before || !st.running() {
            return;
        }
        let deadline = Instant::now() + DISCONNECT;
        loop {
            match self.request(&format!("disk del {name}")) {
                Ok(_) => return,
                Err(e) if e.contains("connected to a VMM") && Instant::now() < deadline => {
                    drop(st);
                    std::thread::sleep(Duration::from_millis(20));
                    st = self.state();
                    if !st.running() {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("wv host: removing disk {name} from the storage service: {e}");
                    return;
                }
            }
        }
    }

    /// The service's counters for every disk (`[]` when it does not run).
    pub fn disks(&self) -> Result<Vec<serde_json::Value>, String> {
        self.stats("disks")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Wants;

    #[test]
    fn sources_names_and_refusals() {
        let d = |s: &str| DiskConfig::parse(s, 0).unwrap();
        assert_eq!(
            disk_source(&d("vmkfs=/ds/a.img:web")),
            "vmkfs=/ds/a.img:web"
        );
        assert_eq!(
            disk_source(&d("vmkfs=/ds:web,readonly=on")),
            "vmkfs=/ds:web,readonly=on"
        );
        assert_eq!(disk_source(&d("path=/i.img")), "path=/i.img");
        assert_eq!(disk_name(7, 1), "7-disk1");
        assert_eq!(
            disk_socket(Path::new("/var/lib/worldvisor/st"), "7-disk1"),
            Path::new("/var/lib/worldvisor/st/7-disk1.sock")
        );
        assert_eq!(check_disk(&d("vmkfs=/ds:web")), Ok(()));
        assert!(check_disk(&d("vmkfs=/d s:web"))
            .unwrap_err()
            .contains("path"));
        let mut w = d("vmkfs=/ds:web");
        w.vmkfs = Some("a:b".into());
        assert!(check_disk(&w).unwrap_err().contains("name"));
        w.vmkfs = Some("a\tb".into());
        assert!(check_disk(&w).is_err());
        let wanted = Wanted {
            disks: vec![("7-disk0".into(), "vmkfs=/ds:web".into())],
            ..Wanted::default()
        };
        assert!(wanted.args().is_empty());
        assert_eq!(wanted.replay(), ["disk add 7-disk0=vmkfs=/ds:web"]);
        assert!(wanted.any());
        assert!(!Wanted::default().any());
    }

    #[test]
    fn disk_shares_are_checked_sent_whole_and_replayed_after_their_disks() {
        let s = DiskShares {
            shares: Some(4),
            reservation_iops: None,
            limit_iops: Some(500),
        };
        assert_eq!(s.validate(), Ok(()));
        assert!(s.any() && !DiskShares::default().any());
        assert_eq!(
            s.request("7-disk0"),
            "disk set 7-disk0 shares=4 reservation_iops=0 limit_iops=500"
        );
        assert_eq!(
            DiskShares::default().request("7-hdisk1"),
            "disk set 7-hdisk1 shares=1000 reservation_iops=0 limit_iops=0",
            "back to the defaults"
        );
        for (bad, why) in [
            (
                DiskShares {
                    shares: Some(0),
                    ..s
                },
                "disk_shares 0: use 1-1000000",
            ),
            (
                DiskShares {
                    shares: Some(wv_shares::MAX_SHARES + 1),
                    ..s
                },
                "disk_shares 1000001: use 1-1000000",
            ),
            (
                DiskShares {
                    reservation_iops: Some(600),
                    ..s
                },
                "disk_reservation_iops 600 is above the disk_limit_iops 500",
            ),
        ] {
            assert_eq!(bad.validate().unwrap_err(), why);
        }
        let w = Wanted {
            disks: vec![
                ("7-disk0".into(), "path=/a.img".into()),
                ("8-disk0".into(), "path=/b.img".into()),
            ],
            shares: vec![("7-disk0".into(), s), ("9-disk0".into(), s)],
            capacity_iops: 700,
            device_capacity: vec![("raw".into(), 50)],
        };
        assert_eq!(
            w.replay(),
            [
                "set capacity_iops=50 device=raw".to_string(),
                "disk add 7-disk0=path=/a.img".to_string(),
                s.request("7-disk0"),
                "disk add 8-disk0=path=/b.img".to_string(),
            ],
            "devices' own capacities first; settings follow their disk; none for a disk not served"
        );
        assert_eq!(w.args(), ["--capacity-iops", "700"]);
    }
}
