//! Worlds: their definition (a [`VmConfig`] plus what only the daemon uses: a name and the
//! scheduler's settings), state and what the daemon knows of their VMM process.
//! [`VmSpec::validate`] is the one check of a definition, shared by the client and the daemon:
//! what passes it can be handed whole to `wv run --config`.

use serde::{Deserialize, Deserializer, Serialize};
use wv_config::{KernelSource, VmConfig};

/// Longest VM name.
pub const MAX_NAME: usize = 64;
/// Longest kernel command line (bytes, without the terminating NUL). Linux on x86 takes
/// 2048 by default and up to 4096 when built for more; the VMM's own limit is higher.
pub const MAX_CMDLINE: usize = 4096;
/// Longest path (`kernel`, `initrd`, a disk's), and longest name (an embedded kernel's, a
/// VMKFS disk's).
pub const MAX_PATH: usize = 4096;
/// Most `disks` and most `nets` of one VM.
pub const MAX_DEVICES: usize = 16;
/// Largest VM spec, as the daemon stores it (JSON bytes).
pub const MAX_SPEC_BYTES: usize = 16 << 10;

/// Deserializes an optional field that may be absent but not `null` (the API document does
/// not allow `null` there).
pub(crate) fn no_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Whether `name` is a valid VM name: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'
/// (so never `.`, `..`, a hidden file or something that reads as an option).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// Lifecycle of a VM world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Defined, never started (or deleted VMM state cleared).
    Defined,
    /// The VMM process is being started.
    Starting,
    /// The VMM runs the guest.
    Running,
    /// The guest is paused.
    Paused,
    /// The VMM ended normally (guest poweroff, or stopped on request).
    Stopped,
    /// The VMM died or failed; `reason` says how.
    Crashed,
}

/// A VM's definition: its [`VmConfig`] (the fields of `wv run --config`, flattened in) and
/// what only the daemon uses, its name and scheduler settings. Read as
/// [`VmConfig`] reads (typed values, or the shorter forms: memory as `"256M"`, a disk or net
/// as its command-line text); always written typed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name: see [`valid_name`].
    pub name: String,
    /// What the VM is made of, as its VMM receives it.
    #[serde(flatten)]
    pub config: VmConfig,
    /// Scheduler shares, 1 to 10000.
    #[serde(default = "default_shares")]
    pub shares: u32,
    /// CPUs guaranteed while it runs (0 to one per vCPU).
    #[serde(default)]
    pub reservation: f64,
    /// CPUs it may use at most (absent: no limit).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub limit: Option<f64>,
    /// Network shares of each of its ports in the daemon's switch (1 to 1000000; absent:
    /// 1000).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub net_shares: Option<u32>,
    /// Bits per second each of its ports gets whenever it sends that much (absent: none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub net_reservation: Option<u64>,
    /// Bits per second each of its ports never exceeds (absent: no limit).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub net_limit: Option<u64>,
    /// Storage shares of each of its disks the storage service serves, against the other
    /// disks of the same datastore (1 to 1000000; absent: 1000).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub disk_shares: Option<u32>,
    /// I/Os per second each of its served disks gets whenever it asks for that many (absent:
    /// none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub disk_reservation_iops: Option<u64>,
    /// I/Os per second each of its served disks never exceeds (absent: no limit).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub disk_limit_iops: Option<u64>,
}

fn default_shares() -> u32 {
    crate::sched::DEFAULT_SHARES
}

impl VmSpec {
    /// A definition named `name` with every default (the embedded probe guest).
    pub fn new(name: String) -> VmSpec {
        VmSpec {
            name,
            config: VmConfig::default(),
            shares: default_shares(),
            reservation: 0.0,
            limit: None,
            net_shares: None,
            net_reservation: None,
            net_limit: None,
            disk_shares: None,
            disk_reservation_iops: None,
            disk_limit_iops: None,
        }
    }

    /// Checks every field the way `wv run` would, without starting anything, and the
    /// daemon's own bounds (lengths, counts, the size of the whole definition).
    /// Everything `start` will need is checked here, so a definition that passes can start
    /// (its files and TAP devices aside, which may come and go).
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if !valid_name(n) {
            return Err(format!(
                "invalid name '{}': use 1-{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter, digit or '_'",
                n.escape_debug()
            ));
        }
        let c = &self.config;
        let path = |p: &std::path::Path| p.as_os_str().len();
        let kernel = match &c.kernel {
            KernelSource::Path(p) => ("kernel", path(p)),
            KernelSource::Embedded(e) => ("kernel", e.len()),
        };
        let lengths = [
            kernel,
            ("initrd", c.initrd.as_deref().map_or(0, path)),
            ("cmdline", c.cmdline.len()),
        ]
        .into_iter()
        .map(|(f, n)| {
            (
                f,
                n,
                if f == "cmdline" {
                    MAX_CMDLINE
                } else {
                    MAX_PATH
                },
            )
        })
        .chain(c.disks.iter().flat_map(|d| {
            [
                ("disks", path(&d.path), MAX_PATH),
                ("disks", d.vmkfs.as_ref().map_or(0, String::len), MAX_PATH),
            ]
        }));
        for (field, n, max) in lengths {
            if n > max {
                return Err(format!("{field}: {n} bytes is over the limit of {max}"));
            }
        }
        if c.nets.iter().any(|n| n.vhost_user.is_some()) {
            // The VMM runs as root: it must not connect to whatever socket a client names.
            // Under the daemon a VM will join a network the daemon's switch serves instead.
            return Err(
                "nets: vhost-user devices are for wv run only; the daemon does not serve them yet"
                    .to_string(),
            );
        }
        if c.disks.iter().any(|d| d.vhost_user) {
            // As for nets: the VMM must not connect to whatever socket a client names.
            return Err(
                "disks: vhost-user disks are for wv run only; the daemon does not serve them yet"
                    .to_string(),
            );
        }
        for d in c
            .disks
            .iter()
            .filter(|d| d.via == wv_config::DiskVia::Storage)
        {
            crate::storage::check_disk(d)?;
        }
        for (field, n) in [("disks", c.disks.len()), ("nets", c.nets.len())] {
            if n > MAX_DEVICES {
                return Err(format!("{field}: {n} entries, at most {MAX_DEVICES}"));
            }
        }
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_SPEC_BYTES {
            return Err(format!(
                "the definition takes {size} bytes, over the limit of {MAX_SPEC_BYTES}"
            ));
        }
        crate::sched::validate(&self.demand())?;
        // Absent is "none" in a definition; 0 means "remove it" only in a change (PATCH).
        for (what, v) in [
            ("net_reservation", self.net_reservation),
            ("net_limit", self.net_limit),
            ("disk_reservation_iops", self.disk_reservation_iops),
            ("disk_limit_iops", self.disk_limit_iops),
        ] {
            if v == Some(0) {
                return Err(format!("{what} 0: leave it out for none"));
            }
        }
        self.net_shares().validate()?;
        self.disk_shares().validate()?;
        c.validate(wv_config::host_ram()).map_err(|e| e.to_string())
    }

    /// Its ports' settings in the daemon's switch.
    pub fn net_shares(&self) -> crate::network::NetShares {
        crate::network::NetShares {
            shares: self.net_shares,
            reservation: self.net_reservation,
            limit: self.net_limit,
        }
    }

    /// Its served disks' settings in the storage service.
    pub fn disk_shares(&self) -> crate::storage::DiskShares {
        crate::storage::DiskShares {
            shares: self.disk_shares,
            reservation_iops: self.disk_reservation_iops,
            limit_iops: self.disk_limit_iops,
        }
    }

    /// The host files the VM opens, by field: kernel (from a file), initrd, and each disk's
    /// image or datastore.
    pub fn files(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        let c = &self.config;
        let mut v = Vec::new();
        if let KernelSource::Path(k) = &c.kernel {
            v.push(("kernel", k.clone()));
        }
        if let Some(i) = &c.initrd {
            v.push(("initrd", i.clone()));
        }
        for d in &c.disks {
            v.push(("disks", d.path.clone()));
        }
        v
    }

    /// What the scheduler needs to know.
    pub fn demand(&self) -> crate::sched::Demand {
        crate::sched::Demand {
            shares: self.shares,
            reservation: self.reservation,
            limit: self.limit,
            vcpus: self.config.vcpus,
        }
    }
}

/// One VM world as the daemon records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct World {
    /// Unique, never reused.
    pub id: u64,
    /// Its definition.
    pub spec: VmSpec,
    /// Lifecycle state.
    pub state: State,
    /// The VMM process while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How the last run ended (exit code, signal, the VMM's last message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The console socket of the running VMM (`wv vm console` attaches to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// The devices of the definition that were hot-plugged into the running VMM (so not in
    /// the configuration it started with), and what serves them; emptied when the run ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot: Vec<HotPlugged>,
}

/// A device hot-plugged into a VM's current run and kept in its definition since (`POST
/// /v1/vms/{name}/devices`): its id, and the switch port or the storage service's disk that
/// serves it, if the daemon gave it one. A daemon that re-adopts the VMM serves these again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotPlugged {
    /// The device's id (a disk's `id`, a net's name).
    pub id: String,
    /// A net's switch port on its network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// A served disk's name in the storage service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(j: &str) -> Result<VmSpec, serde_json::Error> {
        serde_json::from_str(j)
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let s = spec(r#"{"name":"a"}"#).unwrap();
        assert_eq!(s, VmSpec::new("a".into()));
        let c = &s.config;
        assert_eq!(
            (c.memory, c.vcpus, c.rng, s.shares),
            (256 << 20, 1, true, 1000)
        );
        assert_eq!(c.kernel, KernelSource::Embedded("pvh".into()));
        assert!(spec(r#"{"name":"a","colour":"red"}"#).is_err());
        assert!(spec(r#"{"name":"a","vcpus":"two"}"#).is_err());
        // Where the console goes is the daemon's business, not the client's.
        assert!(spec(r#"{"name":"a","serial":"none"}"#).is_err());
        assert!(spec(r#"{"name":"a","console_socket":"/s"}"#).is_err());
    }

    /// The old string forms and the typed forms give the same definition, and it is written
    /// typed.
    #[test]
    fn both_forms_read_and_the_typed_one_is_written() {
        let old = spec(
            r#"{"name":"a","kernel":"/k","memory":"64M","disks":["vmkfs=/ds:web,readonly=on"],"nets":["tap=t0,mac=52:54:00:00:00:01"],"shares":2000}"#,
        )
        .unwrap();
        let typed = spec(
            r#"{"name":"a","kernel":{"path":"/k"},"memory":67108864,"disks":[{"path":"/ds","vmkfs":"web","readonly":true}],"nets":[{"tap":"t0","mac":"52:54:00:00:00:01"}],"shares":2000}"#,
        )
        .unwrap();
        assert_eq!(old, typed);
        let v = serde_json::to_value(&old).unwrap();
        assert_eq!(v["memory"], 64 << 20);
        assert_eq!(v["kernel"]["path"], "/k");
        assert_eq!(v["cmdline"], wv_config::KERNEL_CMDLINE);
        assert_eq!(v["disks"][0]["id"], "disk0");
        assert_eq!(v["nets"][0]["mac"], "52:54:00:00:00:01");
        assert_eq!(spec(&v.to_string()).unwrap(), old);
    }

    #[test]
    fn validation_mirrors_wv_run() {
        let ok =
            spec(r#"{"name":"web-1","memory":"64M","vcpus":2,"disks":["path=/x.img"]}"#).unwrap();
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            r#"{"name":""}"#,
            r#"{"name":"a b"}"#,
            r#"{"name":"a","vcpus":0}"#,
            r#"{"name":"a","vcpus":33}"#,
            r#"{"name":"a","memory":"1M"}"#,
            r#"{"name":"a","kernel":{"embedded":"nope"}}"#,
            r#"{"name":"a","disks":[{"path":"/x","id":""}]}"#,
            r#"{"name":"a","nets":[{"tap":"a/b"}]}"#,
            r#"{"name":"a","shares":0}"#,
            r#"{"name":"a","reservation":2}"#,
            r#"{"name":"a","limit":0.5,"reservation":0.6}"#,
        ] {
            assert!(spec(bad).unwrap().validate().is_err(), "{bad}");
        }
        // What is not even of its type does not read.
        for bad in [
            r#"{"name":"a","memory":"lots"}"#,
            r#"{"name":"a","disks":["nopath"]}"#,
            r#"{"name":"a","nets":["tap="]}"#,
        ] {
            assert!(spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_that_are_paths_or_options_are_refused() {
        for bad in [
            ".",
            "..",
            ".a",
            "-a",
            "--help",
            "a/b",
            "a\0",
            &"x".repeat(65),
        ] {
            let s = VmSpec::new(bad.into());
            assert!(s.validate().is_err(), "{bad:?}");
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["a", "_a", "a.b", "a-", "A9_.-", &"x".repeat(64)] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn what_cannot_start_is_refused_at_create() {
        for bad in [
            r#"{"name":"a","cmdline":"x\u0000y"}"#,
            r#"{"name":"a","kernel":"/k\u0000"}"#,
            r#"{"name":"a","initrd":"/i\u0000"}"#,
            r#"{"name":"a","disks":["path=/x\u0000.img"]}"#,
            r#"{"name":"a","nets":["tap=t\u00000"]}"#,
            r#"{"name":"a","nets":["vhost-user=/run/other.sock"]}"#,
            r#"{"name":"a","disks":["vhost-user=/run/other.sock"]}"#,
            r#"{"name":"a","disks":[{"path":"/run/other.sock","vhost_user":true,"id":"d"}]}"#,
            r#"{"name":"a","kernel":""}"#,
        ] {
            assert!(spec(bad).unwrap().validate().is_err(), "{bad}");
        }
        // The storage service serves a disk of the definition, never a socket it names.
        assert_eq!(
            spec(r#"{"name":"a","disks":["vmkfs=/ds:web,via=storage"]}"#)
                .unwrap()
                .validate(),
            Ok(())
        );
        for bad in [
            r#"{"name":"a","disks":["vmkfs=/d s:web,via=storage"]}"#,
            r#"{"name":"a","disks":[{"path":"/ds","vmkfs":"a:b","via":"storage"}]}"#,
            r#"{"name":"a","disks":[{"path":"/s.sock","vhost_user":true,"via":"storage"}]}"#,
        ] {
            assert!(spec(bad).unwrap().validate().is_err(), "{bad}");
        }
        assert!(spec(r#"{"name":"a","disks":[{"path":"/ds","via":"elsewhere"}]}"#).is_err());
        let long = |n: usize| spec(&format!(r#"{{"name":"a","cmdline":"{}"}}"#, "x".repeat(n)));
        assert_eq!(long(MAX_CMDLINE).unwrap().validate(), Ok(()));
        assert!(long(MAX_CMDLINE + 1).unwrap().validate().is_err());
        assert!(long(64 << 10).unwrap().validate().is_err());
        let mut many = VmSpec::new("a".into());
        many.config.disks = (0..=MAX_DEVICES)
            .map(|i| wv_config::DiskConfig::parse(&format!("path=/d{i}"), i).unwrap())
            .collect();
        assert!(many.validate().unwrap_err().contains("disks"));
        // Big but individually valid fields: the whole definition is bounded.
        let mut big = VmSpec::new("a".into());
        big.config.kernel = KernelSource::Path(format!("/{}", "k".repeat(MAX_PATH - 1)).into());
        big.config.initrd = Some(format!("/{}", "i".repeat(MAX_PATH - 1)).into());
        big.config.cmdline = "c".repeat(MAX_CMDLINE);
        big.config.disks =
            vec![
                wv_config::DiskConfig::parse(&format!("path=/{}", "d".repeat(MAX_PATH - 1)), 0)
                    .unwrap(),
            ];
        assert!(big.validate().unwrap_err().contains("bytes"));
        let mut long_path = VmSpec::new("a".into());
        long_path.config.initrd = Some(format!("/{}", "i".repeat(MAX_PATH)).into());
        assert!(long_path.validate().unwrap_err().contains("initrd"));
    }

    #[test]
    fn null_is_not_a_value() {
        for bad in [
            r#"{"name":"a","limit":null}"#,
            r#"{"name":"a","kernel":null}"#,
            r#"{"name":"a","cmdline":null}"#,
            r#"{"name":"a","memory":null}"#,
            r#"{"name":"a","shares":null}"#,
        ] {
            assert!(spec(bad).is_err(), "{bad}");
        }
    }
}
