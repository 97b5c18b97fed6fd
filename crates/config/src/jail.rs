//! How a VMM is jailed (`wv run --jail`, and every VMM the daemon starts): the text of the
//! option and its typed form, shared by the command line, the daemon and the VMM.
use crate::ConfigError;
use std::fmt;
use std::path::PathBuf;

/// Whose network namespace a jailed VMM lives in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JailNet {
    /// A new one holding only a loopback device that is down: the VMM reaches no network.
    /// TAPs opened before the jail and vhost-user sockets keep working, and the daemon hands
    /// a migration its connection.
    #[default]
    New,
    /// The host's (a VMM that listens for or connects to migrations by itself).
    Host,
}

/// `--jail uid=N[,gid=N][,dir=PATH][,net=new|host][,nofile=N][,config=FILE]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The unprivileged user the VMM runs as (not 0).
    pub uid: u32,
    /// Its group (not 0; the uid unless given).
    pub gid: u32,
    /// The one host folder visible in the jail, at the same path and writable by the user
    /// if its owner is: sockets, console log, snapshots and migrated disks (the daemon's VM
    /// folder). None: the jail's root holds no host folder at all.
    pub dir: Option<PathBuf>,
    /// The network namespace.
    pub net: JailNet,
    /// The most files the VMM may hold open (RLIMIT_NOFILE).
    pub nofile: u64,
    /// A VM configuration (a file as `wv run --config` reads) whose files are opened before
    /// the jail, besides the VM's own: for `--incoming`, whose VM is known only once received.
    pub config: Option<PathBuf>,
}

/// [`JailConfig::nofile`] unless given.
pub const DEFAULT_NOFILE: u64 = 1024;

impl JailConfig {
    /// A jail for `uid` (group the same) with the defaults.
    pub fn new(uid: u32) -> JailConfig {
        JailConfig {
            uid,
            gid: uid,
            dir: None,
            net: JailNet::New,
            nofile: DEFAULT_NOFILE,
            config: None,
        }
    }

    /// Parses the option's text.
    pub fn parse(s: &str) -> Result<JailConfig, ConfigError> {
        let bad = |m: &str| ConfigError(format!("--jail '{}': {m}", s.escape_debug()));
        let num = |k: &str, v: &str| -> Result<u64, ConfigError> {
            v.parse::<u64>()
                .map_err(|_| bad(&format!("{k}= takes a number, not '{v}'")))
        };
        let id = |k: &str, v: &str| -> Result<u32, ConfigError> {
            match u32::try_from(num(k, v)?) {
                Ok(0) => Err(bad(&format!(
                    "{k}=0 is root: a jail needs an unprivileged id"
                ))),
                Ok(n) if n != u32::MAX => Ok(n),
                _ => Err(bad(&format!("{k}={v} is not a valid id"))),
            }
        };
        let (mut uid, mut gid, mut j) = (None, None, JailConfig::new(1));
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("uid", v)) => uid = Some(id("uid", v)?),
                Some(("gid", v)) => gid = Some(id("gid", v)?),
                Some(("dir", v)) if !v.is_empty() => j.dir = Some(PathBuf::from(v)),
                Some(("config", v)) if !v.is_empty() => j.config = Some(PathBuf::from(v)),
                Some(("net", "new")) => j.net = JailNet::New,
                Some(("net", "host")) => j.net = JailNet::Host,
                Some(("net", v)) => return Err(bad(&format!("net={v}: use new or host"))),
                Some(("nofile", v)) => match num("nofile", v)? {
                    n @ 16..=1_048_576 => j.nofile = n,
                    _ => return Err(bad("nofile= takes 16 to 1048576")),
                },
                _ => {
                    return Err(bad(&format!(
                        "unknown part '{part}' (uid=N[,gid=N][,dir=PATH][,net=new|host][,nofile=N][,config=FILE])"
                    )))
                }
            }
        }
        let Some(uid) = uid else {
            return Err(bad("uid= is required"));
        };
        if let Some(d) = &j.dir {
            if !d.is_absolute() {
                return Err(bad("dir= takes an absolute path"));
            }
        }
        j.uid = uid;
        j.gid = gid.unwrap_or(uid);
        Ok(j)
    }
}

impl fmt::Display for JailConfig {
    /// The text [`JailConfig::parse`] reads back (paths must not hold commas).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={},gid={}", self.uid, self.gid)?;
        if let Some(d) = &self.dir {
            write!(f, ",dir={}", d.display())?;
        }
        if self.net == JailNet::Host {
            write!(f, ",net=host")?;
        }
        if self.nofile != DEFAULT_NOFILE {
            write!(f, ",nofile={}", self.nofile)?;
        }
        if let Some(c) = &self.config {
            write!(f, ",config={}", c.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_refuses() {
        let j = JailConfig::parse("uid=900001,dir=/var/lib/wv/vms/a,net=host,nofile=64").unwrap();
        assert_eq!(
            (j.uid, j.gid, j.net, j.nofile),
            (900001, 900001, JailNet::Host, 64)
        );
        assert_eq!(JailConfig::parse(&j.to_string()).unwrap(), j);
        let k = JailConfig::parse("uid=5,gid=6,config=/x/c.json").unwrap();
        assert_eq!(JailConfig::parse(&k.to_string()).unwrap(), k);
        for (bad, says) in [
            ("gid=5", "uid= is required"),
            ("uid=0", "unprivileged"),
            ("uid=x", "takes a number"),
            ("uid=5,dir=rel", "absolute"),
            ("uid=5,net=none", "use new or host"),
            ("uid=5,nofile=2", "16 to"),
            ("uid=5,chroot=/", "unknown part"),
        ] {
            let e = JailConfig::parse(bad).unwrap_err().0;
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
