//! Worlds: their specification (the options of `wv run`), state and what the daemon knows of
//! their VMM process.

use serde::{Deserialize, Serialize};

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
    /// Unique name: 1-64 of [A-Za-z0-9._-].
    pub name: String,
    /// Kernel image (the embedded probe guest when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "invalid name '{n}': use 1-64 letters, digits, '.', '_' or '-'"
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
