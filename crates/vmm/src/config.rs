//! What a VM is made of, as the user states it, and the checks that make a bad value a clear
//! error before any resource is taken.

use std::path::PathBuf;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Guest RAM when none is given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// The kernel to boot.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// A file (bzImage or PVH ELF).
    Path(PathBuf),
    /// An image built into the binary, with its name.
    Embedded(&'static str, &'static [u8]),
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file or block device; with `vmkfs`, the VMKFS datastore.
    pub path: PathBuf,
    /// The disk's name in the VMKFS datastore at `path`.
    pub vmkfs: Option<String>,
    /// Refuse guest writes (and open the image read-only, sharing it).
    pub readonly: bool,
    /// What the guest reads with GET_ID (at most 20 bytes), and the accounting name.
    pub id: String,
}

impl DiskConfig {
    /// Parses `path=IMG|vmkfs=DATASTORE:NAME[,readonly=on|off][,id=NAME]`; `index` names a
    /// disk without an id.
    pub fn parse(spec: &str, index: usize) -> Result<DiskConfig, ConfigError> {
        let mut path = None;
        let mut vmkfs = None;
        let mut readonly = false;
        let mut id = format!("disk{index}");
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() && vmkfs.is_none() => {
                    path = Some(PathBuf::from(p))
                }
                Some(("vmkfs", v)) if path.is_none() => match v.rsplit_once(':') {
                    Some((ds, name)) if !ds.is_empty() && !name.is_empty() => {
                        path = Some(PathBuf::from(ds));
                        vmkfs = Some(name.to_string());
                    }
                    _ => {
                        return Err(ConfigError(format!(
                            "--disk '{spec}': vmkfs= takes DATASTORE:NAME"
                        )))
                    }
                },
                Some(("readonly", "on")) => readonly = true,
                Some(("readonly", "off")) => readonly = false,
                Some(("id", v)) if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_graphic()) => {
                    id = v.to_string()
                }
                _ => {
                    return Err(ConfigError(format!(
                        "--disk '{spec}': expected path=IMG or vmkfs=DATASTORE:NAME, then [,readonly=on|off][,id=NAME] (NAME: 1-20 printable characters); '{part}' is not understood"
                    )))
                }
            }
        }
        let path = path.ok_or_else(|| {
            ConfigError(format!(
                "--disk '{spec}' has no path=IMG or vmkfs=DATASTORE:NAME"
            ))
        })?;
        Ok(DiskConfig {
            path,
            vmkfs,
            readonly,
            id,
        })
    }

    /// The `--disk` text that [`DiskConfig::parse`] reads back as this disk at `index` (how a
    /// client hands a parsed, path-resolved disk to the daemon, which passes it to `wv run`);
    /// the id is left out when it is the default for `index`.
    pub fn to_spec(&self, index: usize) -> Result<String, ConfigError> {
        let path = self
            .path
            .to_str()
            .filter(|p| !p.contains(','))
            .ok_or_else(|| {
                ConfigError(format!(
                    "--disk: the path {} cannot be passed on (it must be UTF-8 without ',')",
                    self.path.display()
                ))
            })?;
        let mut s = match &self.vmkfs {
            Some(name) => format!("vmkfs={path}:{name}"),
            None => format!("path={path}"),
        };
        if self.readonly {
            s.push_str(",readonly=on");
        }
        if self.id != format!("disk{index}") {
            s.push_str(",id=");
            s.push_str(&self.id);
        }
        Ok(s)
    }
}

/// A virtio-net device on a TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface name (created when missing and permitted).
    pub tap: String,
    /// MAC address; generated (locally administered) when absent.
    pub mac: Option<[u8; 6]>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC]`.
    pub fn parse(spec: &str) -> Result<NetConfig, ConfigError> {
        let mut tap = None;
        let mut mac = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !t.is_empty() && t.len() <= 15 => tap = Some(t.to_string()),
                Some(("mac", m)) => match parse_mac(m) {
                    Some(m) if m[0] & 1 == 0 => mac = Some(m),
                    _ => return Err(ConfigError(format!("--net '{spec}': '{m}' is not a unicast MAC address"))),
                },
                _ => {
                    return Err(ConfigError(format!(
                        "--net '{spec}': expected tap=NAME[,mac=MAC] (NAME: 1-15 characters); '{part}' is not understood"
                    )))
                }
            }
        }
        let tap = tap.ok_or_else(|| ConfigError(format!("--net '{spec}' has no tap=NAME")))?;
        Ok(NetConfig { tap, mac })
    }

    /// The `--net` text that [`NetConfig::parse`] reads back as this device.
    pub fn to_spec(&self) -> String {
        match self.mac {
            Some(m) => format!(
                "tap={},mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                self.tap, m[0], m[1], m[2], m[3], m[4], m[5]
            ),
            None => format!("tap={}", self.tap),
        }
    }
}

/// One VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel.
    pub kernel: KernelSource,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Serial console.
    pub serial: SerialMode,
    /// A Unix socket where one client at a time attaches to the serial console (output and
    /// input), besides `serial`.
    pub console_socket: Option<PathBuf>,
    /// A Unix socket serving the VMM's control API ([`crate::control`]).
    pub api_socket: Option<PathBuf>,
    /// A virtio-rng device (entropy for the guest).
    pub rng: bool,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, after the disks.
    pub nets: Vec<NetConfig>,
}

/// A value the user gave that cannot work.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a size such as `256M`, `2G`, `512K`, `1T` or a plain number of bytes (binary units;
/// an optional trailing `B`/`iB` is accepted: `256MiB`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "invalid size '{s}': use a number with K, M, G or T (e.g. 256M, 2G)"
        ))
    };
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 0),
        _ => return Err(bad()),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `bytes` in the largest unit of [`parse_size`] that states it exactly (`512M`, `4100K`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Host RAM in bytes.
pub fn host_ram() -> u64 {
    // SAFETY: sysinfo fills the struct we pass and nothing else.
    unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) == 0 {
            si.totalram.saturating_mul(u64::from(si.mem_unit))
        } else {
            u64::MAX
        }
    }
}

impl VmConfig {
    /// A VM with the defaults: 1 vCPU, [`DEFAULT_MEMORY`], serial on stdio, virtio-rng.
    pub fn new(kernel: KernelSource, cmdline: String) -> VmConfig {
        VmConfig {
            kernel,
            initrd: None,
            cmdline,
            memory: DEFAULT_MEMORY,
            vcpus: 1,
            serial: SerialMode::Stdio,
            console_socket: None,
            api_socket: None,
            rng: true,
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Checks sizes and counts against the machine model and the host (`host_ram` bytes).
    pub fn validate(&self, host_ram: u64) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError(format!(
                "--vcpus {} is out of range: 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        let min = wv_machine::layout::MIN_MEMORY;
        if self.memory < min {
            return Err(ConfigError(format!(
                "--memory of {} bytes is too small: at least {} MiB",
                self.memory,
                min >> 20
            )));
        }
        if !self.memory.is_multiple_of(4096) {
            return Err(ConfigError(format!(
                "--memory of {} bytes is not a multiple of 4 KiB",
                self.memory
            )));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if self.disks[..i].iter().any(|o| o.id == d.id) {
                return Err(ConfigError(format!("two disks have the id '{}'", d.id)));
            }
        }
        if self.memory > host_ram {
            return Err(ConfigError(format!(
                "--memory of {} MiB exceeds this host's {} MiB of RAM",
                self.memory >> 20,
                host_ram >> 20
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "M",
            "-1M",
            "1.5G",
            "12Q",
            "99999999999999999999G",
            "0x10M",
            " G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_round_trip() {
        for (b, t) in [
            (256 << 20, "256M"),
            (2 << 30, "2G"),
            (4100 << 10, "4100K"),
            (4097, "4097"),
            (0, "0"),
            (1 << 40, "1T"),
        ] {
            assert_eq!(format_size(b), t);
            assert_eq!(parse_size(t), Ok(b));
        }
    }

    #[test]
    fn specs_round_trip() {
        for d in ["path=/a b.img", "vmkfs=/dev/sdb:1:web,readonly=on,id=root"] {
            assert_eq!(DiskConfig::parse(d, 0).unwrap().to_spec(0).unwrap(), d);
        }
        // A default id stays the default of the disk's place; another place keeps it.
        let d = DiskConfig::parse("path=x.img,readonly=on", 2).unwrap();
        assert_eq!(d.to_spec(2).unwrap(), "path=x.img,readonly=on");
        assert_eq!(DiskConfig::parse(&d.to_spec(0).unwrap(), 0).unwrap(), d);
        let mut bad = d.clone();
        bad.path = "/a,b/x.img".into();
        assert!(bad.to_spec(2).unwrap_err().0.contains("','"));
        for n in ["tap=t0", "tap=tap9,mac=52:54:00:ab:cd:ef"] {
            assert_eq!(NetConfig::parse(n).unwrap().to_spec(), n);
        }
    }

    fn cfg() -> VmConfig {
        VmConfig::new(KernelSource::Embedded("x", &[]), String::new())
    }

    #[test]
    fn net_specs() {
        assert_eq!(
            NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56").unwrap(),
            NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
            }
        );
        assert_eq!(NetConfig::parse("tap=t").unwrap().mac, None);
        for bad in [
            "",
            "tap=",
            "mac=52:54:00:12:34:56",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,mac=52:54:00:12:34:56:78",
            "tap=t,mac=zz:54:00:12:34:56",
            "tap=waytoolonginterfacename",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_specs() {
        let d = DiskConfig::parse("vmkfs=/dev/sdb:1:web,id=root", 0).unwrap();
        assert_eq!(
            (d.path.to_str(), d.vmkfs.as_deref(), d.id.as_str()),
            (Some("/dev/sdb:1"), Some("web"), "root")
        );
        for bad in [
            "vmkfs=ds",
            "vmkfs=:x",
            "vmkfs=ds:",
            "path=a,vmkfs=ds:x",
            "vmkfs=ds:x,path=a",
        ] {
            assert!(DiskConfig::parse(bad, 0).is_err(), "{bad}");
        }
        let d = DiskConfig::parse("path=a.img,readonly=on,id=root", 0).unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "a.img".into(),
                vmkfs: None,
                readonly: true,
                id: "root".into()
            }
        );
        assert_eq!(DiskConfig::parse("path=b.img", 3).unwrap().id, "disk3");
        for bad in [
            "",
            "a.img",
            "path=",
            "path=a,readonly=yes",
            "path=a,id=",
            "path=a,id=this-id-is-far-too-long-to-fit",
            "path=a,speed=9",
        ] {
            assert!(DiskConfig::parse(bad, 0).is_err(), "{bad}");
        }
        let mut c = cfg();
        c.disks = vec![
            DiskConfig::parse("path=a,id=x", 0).unwrap(),
            DiskConfig::parse("path=b,id=x", 1).unwrap(),
        ];
        assert!(c.validate(8 << 30).unwrap_err().0.contains("two disks"));
    }

    #[test]
    fn validation() {
        let host = 8u64 << 30;
        assert!(cfg().validate(host).is_ok());
        let mut c = cfg();
        c.vcpus = 0;
        assert!(c.validate(host).unwrap_err().0.contains("1 to 32"));
        c.vcpus = 33;
        assert!(c.validate(host).is_err());
        c.vcpus = 32;
        assert!(c.validate(host).is_ok());
        c.memory = 1 << 20;
        assert!(c.validate(host).unwrap_err().0.contains("too small"));
        c.memory = (64 << 20) + 1;
        assert!(c.validate(host).unwrap_err().0.contains("4 KiB"));
        c.memory = 16 << 30;
        assert!(c.validate(host).unwrap_err().0.contains("exceeds"));
    }
}
