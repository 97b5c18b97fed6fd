//! How a [`VmConfig`] is read: the typed form it is written in, and the shorter forms people
//! write by hand or that older clients and state files hold (a kernel as a plain path, memory
//! as a size string, a disk or net as its command-line text). Every form ends in the same
//! typed values; defaults that depend on other fields (the command line on the kernel, a
//! disk's id on its place) are filled in here.

use crate::{ConfigError, DiskConfig, KernelSource, NetConfig, VmConfig};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// Deserializes an optional field that may be absent but not `null`.
pub fn no_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A MAC address as `"aa:bb:cc:dd:ee:ff"` (for `#[serde(with = "wire::mac")]` on an
/// `Option<[u8; 6]>` that is skipped when absent).
pub mod mac {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the address as text.
    pub fn serialize<S: Serializer>(m: &Option<[u8; 6]>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_str(&crate::format_mac(m)),
            None => s.serialize_none(),
        }
    }

    /// Reads the address from text (`null` is refused: leave the field out).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
        let t = String::deserialize(d)?;
        crate::parse_mac(&t).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{}' is not a MAC address (aa:bb:cc:dd:ee:ff)",
                t.escape_debug()
            ))
        })
    }
}

/// A size: a number of bytes, or a string [`crate::parse_size`] reads (`"256M"`).
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number of bytes or a size such as \"256M\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("memory: {v} bytes is negative")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            crate::parse_size(v).map_err(|e| E::custom(format!("memory: {e}")))
        }
    }
    d.deserialize_any(V)
}

impl<'de> Deserialize<'de> for KernelSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KernelSource, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KernelSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a kernel path, {\"path\": PATH} or {\"embedded\": NAME}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KernelSource, E> {
                Ok(KernelSource::Path(PathBuf::from(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<KernelSource, A::Error> {
                let Some(key) = m.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                let k = match key.as_str() {
                    "path" => KernelSource::Path(m.next_value()?),
                    "embedded" => KernelSource::Embedded(m.next_value()?),
                    other => return Err(de::Error::unknown_field(other, &["path", "embedded"])),
                };
                if m.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(
                        "kernel: give one of path or embedded, not both",
                    ));
                }
                Ok(k)
            }
        }
        d.deserialize_any(V)
    }
}

/// A disk as it may be written: the `--disk` text, or the object (its id optional).
enum DiskIn {
    Text(String),
    Object(DiskObject),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskObject {
    path: PathBuf,
    #[serde(default, deserialize_with = "no_null")]
    vmkfs: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default, deserialize_with = "no_null")]
    id: Option<String>,
    #[serde(default)]
    vhost_user: bool,
    #[serde(default)]
    via: crate::DiskVia,
}

/// A net as it may be written: the `--net` text, or the object.
enum NetIn {
    Text(String),
    Object(NetConfig),
}

/// Text or an object, each read by its own rules.
fn text_or_object<'de, D, T, R>(
    d: D,
    what: &'static str,
    text: fn(String) -> R,
    object: fn(T) -> R,
) -> Result<R, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, R> {
        what: &'static str,
        text: fn(String) -> R,
        object: fn(T) -> R,
    }
    impl<'de, T: Deserialize<'de>, R> Visitor<'de> for V<T, R> {
        type Value = R;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.what)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<R, E> {
            Ok((self.text)(v.to_string()))
        }
        fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<R, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(m)).map(self.object)
        }
    }
    d.deserialize_any(V { what, text, object })
}

impl<'de> Deserialize<'de> for DiskIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DiskIn, D::Error> {
        text_or_object(
            d,
            "a disk: \"path=IMG[,readonly=on][,id=NAME]\", \"vhost-user=SOCKET\" or {\"path\": IMG, ...}",
            DiskIn::Text,
            DiskIn::Object,
        )
    }
}

impl<'de> Deserialize<'de> for NetIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NetIn, D::Error> {
        text_or_object(
            d,
            "a net: \"tap=NAME[,mac=MAC]\", \"vhost-user=SOCKET[,mac=MAC]\" or {\"tap\": NAME, \"mac\": MAC}",
            NetIn::Text,
            NetIn::Object,
        )
    }
}

fn default_memory() -> u64 {
    crate::DEFAULT_MEMORY
}
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// A [`VmConfig`] as read, before the defaults that depend on other fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmConfigIn {
    #[serde(default, deserialize_with = "no_null")]
    kernel: Option<KernelSource>,
    #[serde(default, deserialize_with = "no_null")]
    initrd: Option<PathBuf>,
    #[serde(default, deserialize_with = "no_null")]
    cmdline: Option<String>,
    #[serde(default = "default_memory", deserialize_with = "size")]
    memory: u64,
    #[serde(default)]
    memory_shared: bool,
    #[serde(default = "one")]
    vcpus: u32,
    #[serde(default = "yes")]
    rng: bool,
    #[serde(default)]
    balloon: bool,
    #[serde(default)]
    disks: Vec<DiskIn>,
    #[serde(default)]
    nets: Vec<NetIn>,
}

impl TryFrom<VmConfigIn> for VmConfig {
    type Error = ConfigError;

    fn try_from(w: VmConfigIn) -> Result<VmConfig, ConfigError> {
        let kernel = w.kernel.unwrap_or_default();
        let cmdline = w
            .cmdline
            .unwrap_or_else(|| kernel.default_cmdline().to_string());
        let mut c = VmConfig::new(kernel, cmdline);
        c.initrd = w.initrd;
        c.memory = w.memory;
        c.memory_shared = w.memory_shared;
        c.vcpus = w.vcpus;
        c.rng = w.rng;
        c.balloon = w.balloon;
        for (i, d) in w.disks.into_iter().enumerate() {
            c.disks.push(match d {
                DiskIn::Text(t) => DiskConfig::parse(&t, i)?,
                DiskIn::Object(o) => DiskConfig {
                    path: o.path,
                    vmkfs: o.vmkfs,
                    readonly: o.readonly,
                    id: o.id.unwrap_or_else(|| format!("disk{i}")),
                    vhost_user: o.vhost_user,
                    via: o.via,
                },
            });
        }
        for n in w.nets {
            c.nets.push(match n {
                NetIn::Text(t) => NetConfig::parse(&t)?,
                NetIn::Object(n) => n,
            });
        }
        Ok(c)
    }
}

/// The fields of [`VmConfigIn`]: what a [`VmConfig`] takes from a map, also when it is
/// flattened into a larger definition (the daemon's), where only these keys reach it.
const FIELDS: &[&str] = &[
    "kernel",
    "initrd",
    "cmdline",
    "memory",
    "memory_shared",
    "vcpus",
    "rng",
    "balloon",
    "disks",
    "nets",
];

/// A [`VmConfig`] is read from a map only (serde would also take a struct from a sequence,
/// `[]` for `{}`).
impl<'de> Deserialize<'de> for VmConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<VmConfig, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VmConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a VM configuration (an object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<VmConfig, A::Error> {
                let w = VmConfigIn::deserialize(de::value::MapAccessDeserializer::new(m))?;
                VmConfig::try_from(w).map_err(de::Error::custom)
            }
        }
        d.deserialize_struct("VmConfig", FIELDS, V)
    }
}
