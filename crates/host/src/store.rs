//! The daemon's persistent state: every world in one JSON document, replaced atomically
//! (written to a temporary file, synced, renamed over the old one, directory synced), so a
//! crash at any point leaves either the old or the new document. It also owns the per-VM
//! folders under `vms/`: every path to one is made by [`Store::vm_dir`], which refuses a name
//! that would lead anywhere but to a folder directly inside `vms/`.

use crate::world::World;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The stored document.
#[derive(Default, Debug, Serialize, Deserialize)]
pub struct Document {
    /// Next world id.
    pub next_id: u64,
    /// Worlds.
    pub worlds: Vec<World>,
    /// Networks (`wv net create`), served by the switch world ([`crate::network`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<crate::network::NetworkSpec>,
}

/// The store in a state directory (a handle: clones name the same directory).
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("worlds.json")
    }

    /// Per-VM directory (console and VMM logs): `vms/NAME`, refused unless NAME is one plain
    /// path component (not `.`, `..`, nothing with a `/` or a NUL) and what is there, if
    /// anything, is a real directory (not a symbolic link out of the state directory).
    pub fn vm_dir(&self, name: &str) -> std::io::Result<PathBuf> {
        let refuse = |why: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("VM name '{}' {why}", name.escape_debug()),
            )
        };
        let mut parts = Path::new(name).components();
        let one = matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(c)), None) if c == name
        );
        if !one || name.contains('\0') || name.contains('/') {
            return Err(refuse("is not a plain file name"));
        }
        let vms = self.dir.join("vms");
        let dir = vms.join(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if !m.is_dir() => return Err(refuse("names something other than a folder")),
            _ => {}
        }
        if dir.parent() != Some(vms.as_path()) {
            return Err(refuse("leads outside the VM folders"));
        }
        Ok(dir)
    }

    /// The folder of snapshots (`snapshots/`).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The folder of snapshot `name` (`snapshots/NAME`), under the same rules as
    /// [`Store::vm_dir`]: one plain path component, nothing but a real folder there.
    pub fn snapshot_dir(&self, name: &str) -> std::io::Result<PathBuf> {
        let refuse = |why: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("snapshot name '{}' {why}", name.escape_debug()),
            )
        };
        if !crate::world::valid_name(name) {
            return Err(refuse("is not a valid name"));
        }
        let base = self.snapshots_dir();
        let dir = base.join(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if !m.is_dir() => return Err(refuse("names something other than a folder")),
            _ => {}
        }
        if dir.parent() != Some(base.as_path()) {
            return Err(refuse("leads outside the snapshot folders"));
        }
        Ok(dir)
    }

    /// Where deleted VMs' folders wait for their removal.
    fn trash(&self) -> PathBuf {
        self.dir.join("trash")
    }

    /// Moves the folder of VM `name` (world `id`) out of the way at once, so that a new VM of
    /// the same name starts with a fresh folder, and returns where it went, for the caller to
    /// remove at leisure ([`Store::remove_trash`]). `None` when there was no folder.
    pub fn discard_vm_dir(&self, name: &str, id: u64) -> std::io::Result<Option<PathBuf>> {
        let dir = self.vm_dir(name)?;
        if std::fs::symlink_metadata(&dir).is_err() {
            return Ok(None);
        }
        std::fs::create_dir_all(self.trash())?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let to = self.trash().join(format!("{id}-{stamp}"));
        std::fs::rename(&dir, &to)?;
        Ok(Some(to))
    }

    /// Removes one discarded folder, or (with `None`) everything in the trash (what a daemon
    /// that ended before removing it left).
    pub fn remove_trash(&self, one: Option<&Path>) -> std::io::Result<()> {
        let trash = self.trash();
        match one {
            Some(p) if p.parent() == Some(trash.as_path()) => std::fs::remove_dir_all(p),
            Some(p) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not in {}", p.display(), trash.display()),
            )),
            None => match std::fs::read_dir(&trash) {
                Ok(entries) => {
                    for e in entries.flatten() {
                        std::fs::remove_dir_all(e.path())?;
                    }
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    /// Loads the document (empty when none was saved yet).
    pub fn load(&self) -> std::io::Result<Document> {
        match std::fs::read(self.path()) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Document {
                next_id: 1,
                ..Document::default()
            }),
            Err(e) => Err(e),
        }
    }

    /// Replaces the document atomically. An error names the file it failed on.
    pub fn save(&self, doc: &Document) -> std::io::Result<()> {
        let tmp = self.dir.join("worlds.json.tmp");
        let at = |p: &Path| {
            let p = p.display().to_string();
            move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{p}: {e}"))
        };
        let mut f = std::fs::File::create(&tmp).map_err(at(&tmp))?;
        f.write_all(&serde_json::to_vec_pretty(doc).map_err(std::io::Error::other)?)
            .map_err(at(&tmp))?;
        f.sync_all().map_err(at(&tmp))?;
        std::fs::rename(&tmp, self.path()).map_err(at(&self.path()))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(at(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{State, VmSpec};

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("wv-store-{}", std::process::id()));
        let s = Store::open(&dir).unwrap();
        assert!(s.load().unwrap().worlds.is_empty());
        let spec: VmSpec = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        let doc = Document {
            next_id: 2,
            worlds: vec![World {
                id: 1,
                spec,
                state: State::Defined,
                pid: None,
                reason: None,
                console: None,
                hot: Vec::new(),
            }],
            networks: vec![
                crate::network::NetworkSpec {
                    name: "lan".into(),
                    uplink: None,
                    uplink_rate: None,
                },
                crate::network::NetworkSpec {
                    name: "wan".into(),
                    uplink: Some("tap-wan".into()),
                    uplink_rate: Some(100_000_000),
                },
            ],
        };
        s.save(&doc).unwrap();
        let back = s.load().unwrap();
        assert_eq!(back.worlds, doc.worlds);
        assert_eq!(back.networks, doc.networks);
        std::fs::write(dir.join("worlds.json"), b"{not json").unwrap();
        assert!(s.load().unwrap_err().to_string().contains("worlds.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A state directory written before the definition was typed (memory, disks and nets as
    /// strings) loads as the same VMs, and is saved typed.
    #[test]
    fn a_document_of_string_definitions_loads() {
        let dir = std::env::temp_dir().join(format!("wv-store-old-{}", std::process::id()));
        let s = Store::open(&dir).unwrap();
        std::fs::write(
            dir.join("worlds.json"),
            br#"{"next_id":3,"worlds":[{"id":2,"spec":{"name":"web","kernel":"/k","cmdline":"c","memory":"64M","vcpus":2,"disks":["path=/d.img,readonly=on"],"nets":["tap=t0"],"rng":true,"shares":1000,"reservation":0.0},"state":"stopped","reason":"guest powered off with exit code 0"}]}"#,
        )
        .unwrap();
        let doc = s.load().unwrap();
        let c = &doc.worlds[0].spec.config;
        assert_eq!((c.memory, c.vcpus, c.cmdline.as_str()), (64 << 20, 2, "c"));
        assert_eq!(c.kernel, wv_config::KernelSource::Path("/k".into()));
        assert!(c.disks[0].readonly && c.disks[0].id == "disk0");
        assert_eq!(c.nets[0].tap, "t0");
        s.save(&doc).unwrap();
        let text = std::fs::read_to_string(dir.join("worlds.json")).unwrap();
        assert!(text.contains("\"memory\": 67108864"), "{text}");
        assert_eq!(s.load().unwrap().worlds, doc.worlds);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vm_folders_stay_inside_vms() {
        let dir = std::env::temp_dir().join(format!("wv-store-dirs-{}", std::process::id()));
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.vm_dir("a").unwrap(), dir.join("vms/a"));
        for bad in ["", ".", "..", "a/b", "../x", "/etc", "a\0", "./a"] {
            assert!(s.vm_dir(bad).is_err(), "{bad:?}");
        }
        // A symbolic link in vms/ is not followed.
        std::fs::create_dir_all(dir.join("vms")).unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("vms/link")).unwrap();
        assert!(s.vm_dir("link").is_err());
        // Discarding moves the folder away at once; the trash is emptied later.
        std::fs::create_dir_all(dir.join("vms/a")).unwrap();
        std::fs::write(dir.join("vms/a/f"), b"x").unwrap();
        let gone = s.discard_vm_dir("a", 7).unwrap().unwrap();
        assert!(!dir.join("vms/a").exists() && gone.join("f").exists());
        assert_eq!(s.discard_vm_dir("a", 7).unwrap(), None);
        assert!(s.remove_trash(Some(&dir.join("vms"))).is_err());
        s.remove_trash(Some(&gone)).unwrap();
        std::fs::create_dir_all(dir.join("trash/left")).unwrap();
        s.remove_trash(None).unwrap();
        assert_eq!(std::fs::read_dir(dir.join("trash")).unwrap().count(), 0);
        assert!(
            dir.join("vms/link").exists(),
            "the link itself is left alone"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
