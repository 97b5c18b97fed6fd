//! A snapshot deleted right after a restore or a clone from it answered must not take its files
//! away from the VMM that is still starting. The daemon answers once the VMM's process is
//! started, before `wv run --restore` has opened the snapshot's `state` and `memory`; a
//! `DELETE /v1/snapshots/{snap}` at once (as the OpenAPI tests do) used to remove them first,
//! and the VMM ended with "cannot open .../memory", leaving the VM crashed. Here a stand-in VMM
//! opens the files 300 ms after its start, so that window is always hit. Needs no KVM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wv_host::api::Daemon;
use wv_host::http::Request;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("wv-host-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn request(d: &Arc<Daemon>, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let req = Request {
        method: method.into(),
        path: path.into(),
        query: String::new(),
        body: body.as_bytes().to_vec(),
        authorization: None,
        origin: None,
        content_type: Some("application/json".into()),
        host: None,
        cookie: None,
        upgrade: None,
        websocket_key: None,
    };
    let a = d.handle(&req);
    (
        a.status,
        serde_json::from_str(&a.body).unwrap_or(serde_json::Value::Null),
    )
}

/// A stand-in for `wv run --restore DIR ...`: after 300 ms it checks that the snapshot's
/// files are there, as the real VMM opens them; it writes what it found to `verdict` and
/// runs on (until stopped) if they were, or ends as the real VMM does (status 202) if not.
fn fake_vmm(dir: &Path, verdict: &Path) -> PathBuf {
    let p = dir.join("fake-wv");
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = run ] && [ \"$2\" = --restore ] || exit 206\n\
         sleep 0.3\n\
         if [ -f \"$3/state\" ] && [ -f \"$3/memory\" ]; then\n\
         \techo opened > {v}.tmp && mv {v}.tmp {v}\n\
         \texec sleep 60\n\
         fi\n\
         echo missing > {v}.tmp && mv {v}.tmp {v}\n\
         echo \"wv: error: snapshot: cannot open $3/memory: No such file or directory\" >&2\n\
         exit 202\n",
        v = verdict.display()
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Waits for the stand-in's verdict (it comes within a second of its start).
fn verdict(p: &Path) -> String {
    let t = Instant::now();
    loop {
        if let Ok(v) = std::fs::read_to_string(p) {
            let _ = std::fs::remove_file(p);
            return v.trim().to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the stand-in VMM gave no verdict"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A snapshot as the daemon records one: its record, a state file and a memory file.
fn make_snapshot(state: &Path, name: &str) {
    let d = state.join("snapshots").join(name);
    std::fs::create_dir_all(&d).unwrap();
    let meta = serde_json::json!({
        "name": name, "vm": "src", "created": 0, "memory_bytes": 4096, "state_bytes": 16,
        "duration_ms": 1.0, "config": serde_json::from_str::<serde_json::Value>(
            &serde_json::to_string(&wv_config::VmConfig::default()).unwrap()).unwrap(),
    });
    std::fs::write(d.join("snapshot.json"), meta.to_string()).unwrap();
    std::fs::write(d.join("state"), b"WVSNAP\r\n state").unwrap();
    std::fs::write(d.join("memory"), vec![0u8; 4096]).unwrap();
}

#[test]
fn a_snapshot_deleted_at_once_does_not_crash_the_vms_starting_from_it() {
    let dir = Dir::new("restore-delete");
    let state = dir.0.join("state");
    let verdict_file = dir.0.join("verdict");
    let wv = fake_vmm(&dir.0, &verdict_file);
    let d = Daemon::open(&state, &dir.0.join("wv.sock"), wv).unwrap();
    for (i, how) in ["restore", "clone", "restore", "clone"].iter().enumerate() {
        let snap = format!("s{i}");
        make_snapshot(&state, &snap);
        let vm = format!("{how}{i}");
        let (status, body) = if *how == "restore" {
            assert_eq!(
                request(&d, "POST", "/v1/vms", &format!(r#"{{"name":"{vm}"}}"#)).0,
                201
            );
            request(
                &d,
                "POST",
                &format!("/v1/vms/{vm}/restore"),
                &format!(r#"{{"snapshot":"{snap}"}}"#),
            )
        } else {
            request(
                &d,
                "POST",
                &format!("/v1/snapshots/{snap}/clone"),
                &format!(r#"{{"name":"{vm}"}}"#),
            )
        };
        assert!(status == 200 || status == 201, "{how}: {status} {body}");
        // Deleted at once, while the VMM has not yet opened the files.
        assert_eq!(
            request(&d, "DELETE", &format!("/v1/snapshots/{snap}"), "").0,
            204
        );
        assert_eq!(
            verdict(&verdict_file),
            "opened",
            "{how} {vm}: the VMM found its snapshot's files gone"
        );
        let (status, w) = request(&d, "POST", &format!("/v1/vms/{vm}/stop"), "");
        assert_eq!(status, 200, "{how} {vm}: {w}");
        assert_eq!(w["state"], "stopped", "{how} {vm}: {w}");
        // Nothing of the snapshot is kept once its VMM has ended.
        assert!(
            !state.join("vms").join(&vm).join("restoring").exists(),
            "{vm}: the links to the deleted snapshot outlived its VMM"
        );
    }
    d.close();
}
