//! Worlds: their specification (the options of `wv run`), state and what the daemon knows of
//! their VMM process. [`VmSpec::validate`] is the one check of a definition, shared by the
//! client and the daemon: what passes it can be turned into a `wv run` command line.

use serde::{Deserialize, Deserializer, Serialize};

/// Longest VM name.
pub const MAX_NAME: usize = 64;
/// Longest kernel command line (bytes, without the terminating NUL). Linux on x86 takes
/// 2048 by default and up to 4096 when built for more; the VMM's own limit is higher.
pub const MAX_CMDLINE: usize = 4096;
/// Longest path (`kernel`, `initrd`), and longest `disks`/`nets` entry.
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

/// What a VM is made of: the options of `wv run`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique name: see [`valid_name`].
    pub name: String,
    /// Kernel image (the embedded probe guest when absent).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub kernel: Option<String>,
    /// Initial ramdisk.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "no_null"
    )]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. "256M".
    #[serde(default = "default_memory")]
    pub memory: String,
    /// vCPUs, 1 to 32.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// `--disk` specifications.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// `--net` specifications.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    /// A virtio-rng device.
    #[serde(default = "default_true")]
    pub rng: bool,
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
}

fn default_shares() -> u32 {
    crate::sched::DEFAULT_SHARES
}

fn default_memory() -> String {
    "256M".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

impl VmSpec {
    /// Checks every field the way `wv run` would, without starting anything.
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
        let strings = [
            ("kernel", self.kernel.as_deref(), MAX_PATH),
            ("initrd", self.initrd.as_deref(), MAX_PATH),
            ("cmdline", self.cmdline.as_deref(), MAX_CMDLINE),
            ("memory", Some(self.memory.as_str()), 64),
        ];
        let lists = self
            .disks
            .iter()
            .map(|d| ("disks", Some(d.as_str()), MAX_PATH))
            .chain(
                self.nets
                    .iter()
                    .map(|d| ("nets", Some(d.as_str()), MAX_PATH)),
            );
        for (field, v, max) in strings.into_iter().chain(lists) {
            let Some(v) = v else { continue };
            if v.contains('\0') {
                return Err(format!("{field}: contains a NUL byte"));
            }
            if v.len() > max {
                return Err(format!(
                    "{field}: {} bytes is over the limit of {max}",
                    v.len()
                ));
            }
        }
        for (field, v) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if v.as_deref() == Some("") {
                return Err(format!("{field}: empty path"));
            }
        }
        for (field, n) in [("disks", self.disks.len()), ("nets", self.nets.len())] {
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
        let memory = wv_vmm::parse_size(&self.memory).map_err(|e| format!("memory: {e}"))?;
        let mut cfg =
            wv_vmm::VmConfig::new(wv_vmm::KernelSource::Embedded("probe", &[]), String::new());
        cfg.memory = memory;
        cfg.vcpus = self.vcpus;
        for (i, d) in self.disks.iter().enumerate() {
            cfg.disks
                .push(wv_vmm::DiskConfig::parse(d, i).map_err(|e| e.to_string())?);
        }
        for n in &self.nets {
            cfg.nets
                .push(wv_vmm::NetConfig::parse(n).map_err(|e| e.to_string())?);
        }
        cfg.validate(wv_vmm::config::host_ram())
            .map_err(|e| e.to_string())
    }

    /// The host files the VM opens, by field: kernel, initrd, and each disk's image or
    /// datastore (a disk that does not parse is left to [`VmSpec::validate`]).
    pub fn files(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        let mut v = Vec::new();
        if let Some(k) = &self.kernel {
            v.push(("kernel", k.into()));
        }
        if let Some(i) = &self.initrd {
            v.push(("initrd", i.into()));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Ok(c) = wv_vmm::DiskConfig::parse(d, i) {
                v.push(("disks", c.path));
            }
        }
        v
    }

    /// What the scheduler needs to know.
    pub fn demand(&self) -> crate::sched::Demand {
        crate::sched::Demand {
            shares: self.shares,
            reservation: self.reservation,
            limit: self.limit,
            vcpus: self.vcpus,
        }
    }

    /// The `wv run` arguments for this VM.
    pub fn run_args(&self, console: &std::path::Path, socket: &std::path::Path) -> Vec<String> {
        let mut a = vec![
            "run".into(),
            "--memory".into(),
            self.memory.clone(),
            "--vcpus".into(),
            self.vcpus.to_string(),
        ];
        for (flag, v) in [
            ("--kernel", &self.kernel),
            ("--initrd", &self.initrd),
            ("--cmdline", &self.cmdline),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.clone());
            }
        }
        for d in &self.disks {
            a.push("--disk".into());
            a.push(d.clone());
        }
        for n in &self.nets {
            a.push("--net".into());
            a.push(n.clone());
        }
        if !self.rng {
            a.push("--rng".into());
            a.push("off".into());
        }
        a.push("--serial".into());
        a.push(console.display().to_string());
        a.push("--console-socket".into());
        a.push(socket.display().to_string());
        a
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
        assert_eq!((s.memory.as_str(), s.vcpus, s.rng), ("256M", 1, true));
        assert!(spec(r#"{"name":"a","colour":"red"}"#).is_err());
        assert!(spec(r#"{"name":"a","vcpus":"two"}"#).is_err());
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
            r#"{"name":"a","memory":"lots"}"#,
            r#"{"name":"a","memory":"1M"}"#,
            r#"{"name":"a","disks":["nopath"]}"#,
            r#"{"name":"a","nets":["tap="]}"#,
            r#"{"name":"a","shares":0}"#,
            r#"{"name":"a","reservation":2}"#,
            r#"{"name":"a","limit":0.5,"reservation":0.6}"#,
        ] {
            assert!(spec(bad).unwrap().validate().is_err(), "{bad}");
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
            let s = VmSpec {
                name: bad.into(),
                ..spec(r#"{"name":"a"}"#).unwrap()
            };
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
            r#"{"name":"a","kernel":""}"#,
        ] {
            assert!(spec(bad).unwrap().validate().is_err(), "{bad}");
        }
        let long = |n: usize| spec(&format!(r#"{{"name":"a","cmdline":"{}"}}"#, "x".repeat(n)));
        assert_eq!(long(MAX_CMDLINE).unwrap().validate(), Ok(()));
        assert!(long(MAX_CMDLINE + 1).unwrap().validate().is_err());
        assert!(long(64 << 10).unwrap().validate().is_err());
        let disks: Vec<String> = (0..=MAX_DEVICES).map(|i| format!("path=/d{i}")).collect();
        let many = VmSpec {
            disks,
            ..spec(r#"{"name":"a"}"#).unwrap()
        };
        assert!(many.validate().unwrap_err().contains("disks"));
        // Big but individually valid fields: the whole definition is bounded.
        let big = VmSpec {
            kernel: Some(format!("/{}", "k".repeat(MAX_PATH - 1))),
            initrd: Some(format!("/{}", "i".repeat(MAX_PATH - 1))),
            cmdline: Some("c".repeat(MAX_CMDLINE)),
            disks: vec![format!("path=/{}", "d".repeat(MAX_PATH - 6))],
            ..spec(r#"{"name":"a"}"#).unwrap()
        };
        assert!(big.validate().unwrap_err().contains("bytes"));
    }

    #[test]
    fn null_is_not_a_value() {
        for bad in [
            r#"{"name":"a","limit":null}"#,
            r#"{"name":"a","kernel":null}"#,
            r#"{"name":"a","cmdline":null}"#,
            r#"{"name":"a","shares":null}"#,
        ] {
            assert!(spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_arguments() {
        let s = spec(r#"{"name":"a","cmdline":"x y","rng":false,"disks":["path=d"]}"#).unwrap();
        let a = s.run_args(
            std::path::Path::new("/c.log"),
            std::path::Path::new("/c.sock"),
        );
        assert!(a.windows(2).any(|w| w == ["--cmdline", "x y"]));
        assert!(a.windows(2).any(|w| w == ["--disk", "path=d"]));
        assert!(a.windows(2).any(|w| w == ["--rng", "off"]));
        assert!(a.windows(2).any(|w| w == ["--serial", "/c.log"]));
    }
}
