//! The daemon's persistent state: every world in one JSON document, replaced atomically
//! (written to a temporary file, synced, renamed over the old one, directory synced), so a
//! crash at any point leaves either the old or the new document.

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
}

/// The store in a state directory.
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

    /// Per-VM directory (console and VMM logs).
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join("vms").join(name)
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
                worlds: Vec::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Replaces the document atomically.
    pub fn save(&self, doc: &Document) -> std::io::Result<()> {
        let tmp = self.dir.join("worlds.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(doc).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.path())?;
        std::fs::File::open(&self.dir)?.sync_all()
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
            }],
        };
        s.save(&doc).unwrap();
        let back = s.load().unwrap();
        assert_eq!(back.worlds, doc.worlds);
        std::fs::write(dir.join("worlds.json"), b"{not json").unwrap();
        assert!(s.load().unwrap_err().to_string().contains("worlds.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
