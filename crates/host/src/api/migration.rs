//! Live migration between two daemons: the target's `POST /v1/vms/{name}/incoming` (define
//! the VM and start a VMM waiting for it) and the source's `POST /v1/vms/{name}/migrate`
//! (prepare the target over its TCP API, then have the VM's VMM send it there). The stream
//! itself is the VMMs' (docs/MIGRATION.md); this module only drives the two daemons.

use super::{
    error, object, ok, Daemon, IncomingRequest, MigrateRequest, Reply, Run, StartFrom,
    LISTEN_TIMEOUT, STOP_GRACE, TARGET_RUNNING_TIMEOUT, TARGET_TIMEOUT,
};
use crate::http;
use crate::supervisor;
use crate::world::{State, VmSpec};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a VM's disks cannot move without `copy_disks`, as its VMM would say (the daemon says
/// it before asking anyone): a writable raw image. VMKFS disks stay on their datastore, which
/// both hosts must open at the same path, and are handed over at the switch-over; read-only
/// disks are opened again by the target. With `copy_disks` every writable disk is copied
/// instead (docs/MIGRATION.md).
fn disks_refused(c: &wv_config::VmConfig) -> Option<String> {
    c.disks
        .iter()
        .find(|d| d.vmkfs.is_none() && !d.readonly)
        .map(|d| {
            format!(
                "the VM has a writable raw disk image ('{}'): migration moves a writable disk \
                 only on a VMKFS datastore both hosts open (a raw image's lock cannot be handed \
                 over without a moment with two writers or none)",
                d.id
            )
        })
}

/// One request to the target daemon: (method, path, body) to (status, body).
type TargetCall<'a> = dyn Fn(&str, &str, Option<&str>) -> std::io::Result<(u16, String)> + 'a;

/// The message of an API error body (`{"error": "..."}`), or the body itself.
fn message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}

/// Whether `to` reads as `HOST:PORT` (a name or an address, `[v6]:port` for IPv6) and
/// nothing else: it ends up in a path and in a request line.
fn host_port(to: &str) -> Option<(&str, u16)> {
    let (host, port) = to.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let plain = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b));
    (!host.is_empty() && plain && !host.starts_with('-')).then_some((host, port))
}

/// The address the source VMM should connect to, from what the target answered: an
/// unspecified IP (the target listens on every address) becomes the host the target daemon
/// was reached at.
fn reachable(answered: &str, target_host: &str) -> Option<String> {
    let a: SocketAddr = answered.parse().ok()?;
    Some(if a.ip().is_unspecified() {
        format!("{target_host}:{}", a.port())
    } else {
        a.to_string()
    })
}

impl Daemon {
    /// `POST /v1/vms/{name}/incoming`: defines VM `name` from the configuration a source
    /// daemon sent (409 if one exists; checked as `POST /v1/vms` checks a definition) and
    /// starts its VMM with `wv run --incoming`. Answers 201 `{"address", "vm"}` once the VMM
    /// listens. The world is `starting` until its guest runs here; if the migration fails
    /// or is called off (DELETE) the VMM ends and the VM is removed.
    pub(super) fn incoming(self: &Arc<Self>, name: &str, body: &[u8]) -> Reply {
        let req: IncomingRequest = match object(body, "incoming request") {
            Ok(r) => r,
            Err(r) => return r,
        };
        if req.config.contains_key("name") {
            return error(
                400,
                "invalid incoming request: the VM's name is in the path, not in config",
            );
        }
        // Read as POST /v1/vms reads a definition: the same fields, the same checks.
        let mut def = req.config;
        def.insert("name".into(), json!(name));
        for (k, v) in [
            ("shares", req.shares.map(|s| json!(s))),
            ("reservation", req.reservation.map(|r| json!(r))),
            ("limit", req.limit.map(|l| json!(l))),
        ] {
            if let Some(v) = v {
                def.insert(k.into(), v);
            }
        }
        let mut spec: VmSpec = match serde_json::from_value(serde_json::Value::Object(def)) {
            Ok(s) => s,
            Err(e) => return error(400, format!("invalid incoming request: config: {e}")),
        };
        let copy = req.copy_disks.unwrap_or(false);
        if copy {
            // The copied disks' new places: raw images in the VM's folder, VMKFS disks in the
            // datastore named (checked as any definition's files are).
            let dir = match self.store.vm_dir(name) {
                Ok(d) => d.join(super::COPIED_DISKS),
                Err(e) => return error(422, e),
            };
            let ds = req.datastore.as_deref().map(std::path::Path::new);
            match wv_config::copied_disk_places(&spec.config, Some(&dir), ds) {
                Ok(c) => spec.config = c,
                Err(e) => return error(422, format!("copy_disks: {}", e.0)),
            }
        } else if req.datastore.is_some() {
            return error(
                422,
                "datastore: where copied VMKFS disks land; it needs \"copy_disks\": true",
            );
        } else if let Some(m) = disks_refused(&spec.config) {
            return error(422, m);
        }
        let listen = match &req.listen {
            Some(l) => match l.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    return error(
                        422,
                        format!("listen: '{l}' is not an ADDR:PORT (an IP address and a port)"),
                    )
                }
            },
            None => SocketAddr::new(
                self.listen
                    .get()
                    .copied()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                0,
            ),
        };
        let (status, body) = self.define(spec);
        if status != 201 {
            return (status, body);
        }
        let dir = match self.store.vm_dir(name) {
            Ok(d) => d,
            Err(e) => return self.undefine(name, error(422, e)),
        };
        let made = if copy {
            std::fs::create_dir_all(dir.join(super::COPIED_DISKS))
        } else {
            std::fs::create_dir_all(&dir)
        };
        if let Err(e) = made {
            return self.undefine(name, error(500, format!("creating {}: {e}", dir.display())));
        }
        // What the log holds already is not this VMM's (the folder is fresh: nothing).
        let log = dir.join("vmm.log");
        let from = std::fs::metadata(&log).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(dir.join(supervisor::API_SOCKET));
        let addr = listen.to_string();
        let (status, body) = self.start_with(name, StartFrom::Incoming(&addr, copy));
        if status != 200 {
            return self.undefine(name, (status, body));
        }
        let Some((id, run)) = self
            .lock()
            .worlds
            .iter()
            .find(|w| w.spec.name == name)
            .and_then(|w| Some((w.id, self.run_of(w.id)?)))
        else {
            return error(
                422,
                format!("VM '{name}': its VMM ended as soon as it started"),
            );
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        let address = loop {
            let text = std::fs::read(&log).unwrap_or_default();
            if let Some(a) = supervisor::listening_on(&text, from) {
                break a;
            }
            if run.pidfd.wait(Some(Duration::from_millis(20))) {
                // Ended before it listened (the address is taken or not this host's): the
                // VM goes with it; its reason is the answer.
                run.wait(STOP_GRACE);
                let why = run
                    .outcome
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "its VMM ended".into());
                return error(
                    422,
                    format!("VM '{name}' cannot wait for a migration on {addr}: {why}"),
                );
            }
            if Instant::now() > deadline {
                let _ = self.delete(name);
                return error(
                    500,
                    format!(
                        "VM '{name}': its VMM did not listen on {addr} within {} s",
                        LISTEN_TIMEOUT.as_secs()
                    ),
                );
            }
        };
        let d = self.clone();
        let (n, r) = (name.to_string(), run.clone());
        if let Err(e) = crate::helper::spawn("incoming", move || d.await_guest(id, &n, &r)) {
            let _ = self.delete(name);
            return error(500, format!("no thread to watch the incoming VM: {e}"));
        }
        let doc = self.lock();
        let vm = doc.worlds.iter().find(|w| w.id == id);
        ok(201, &json!({ "address": address, "vm": vm }))
    }

    /// Removes the VM `name` that this request defined and could not start, and answers
    /// `reply`.
    fn undefine(&self, name: &str, reply: Reply) -> Reply {
        let _ = self.delete(name);
        reply
    }

    /// Marks the incoming world `id` running once its guest runs. The VMM makes its control
    /// socket once it holds the whole stream and has built the VM, and serves it only once
    /// the source has said go and the vCPUs run; a VMM that ends first is recorded by
    /// `finished` (which removes the VM).
    pub(super) fn await_guest(&self, id: u64, name: &str, run: &Run) {
        let Ok(dir) = self.store.vm_dir(name) else {
            return;
        };
        let sock: PathBuf = dir.join(supervisor::API_SOCKET);
        while !sock.exists() {
            if run.pidfd.wait(Some(Duration::from_millis(50))) {
                return;
            }
        }
        match http::request(&sock, "GET", "/vm", None) {
            Ok((200, _)) => {}
            _ => return,
        }
        let mut doc = self.lock();
        let Some(w) = doc
            .worlds
            .iter_mut()
            .find(|w| w.id == id && w.state == State::Starting)
        else {
            return;
        };
        w.state = State::Running;
        w.reason = None;
        if let Err(e) = self.store.save(&doc) {
            eprintln!("wv host: world {id}: saving the state after its migration arrived: {e}");
        }
    }

    /// `POST /v1/vms/{name}/migrate`: moves the running VM to the daemon at `to` (its API
    /// over TCP, with its `token`). The target defines the VM and waits for it; the VM's VMM
    /// sends it (pre-copy, docs/MIGRATION.md); on success this world is `stopped`, "migrated
    /// to HOST:PORT". On failure the VM runs on here and the target's half-made VM is
    /// removed.
    pub(super) fn migrate(self: &Arc<Self>, name: &str, body: &[u8]) -> Reply {
        let req: MigrateRequest = match object(body, "migration request") {
            Ok(r) => r,
            Err(r) => return r,
        };
        let Some((host, _)) = host_port(&req.to) else {
            return error(
                422,
                format!("to: '{}' is not a HOST:PORT", req.to.escape_debug()),
            );
        };
        let token = req.token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return error(
                422,
                "token: empty or not printable ASCII (wv host token on the target shows it)",
            );
        }
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let (spec, run) = {
            let mut doc = self.lock();
            let w = match Self::world(&mut doc, id, name) {
                Ok(w) => w,
                Err(r) => return r,
            };
            match self.run_of(id) {
                Some(run) if w.state == State::Running => (w.spec.clone(), run),
                _ => {
                    return error(
                        409,
                        format!("VM '{name}' is {:?}, not running", w.state).to_lowercase(),
                    )
                }
            }
        };
        let copy = req.copy_disks.unwrap_or(false);
        if !copy && req.datastore.is_some() {
            return error(
                422,
                "datastore: where copied VMKFS disks land on the target; it needs \"copy_disks\": true",
            );
        }
        if let Some(m) = disks_refused(&spec.config).filter(|_| !copy) {
            return error(422, format!("VM '{name}': {m}"));
        }
        if let Some(d) = crate::storage::served_disk(&spec.config) {
            // What its VMM would answer for its vhost-user disk.
            return error(
                422,
                format!("VM '{name}': disk {} is served by the storage service (via=storage), whose writes to guest memory are not dirty-logged and which does not hand disks over: migrating it is not supported", d.id),
            );
        }
        let target = PathBuf::from(format!("tcp:{}", req.to));
        let call = |method: &str, path: &str, body: Option<&str>| {
            http::request_with(
                &target,
                method,
                path,
                body,
                Some(token),
                Some(TARGET_TIMEOUT),
            )
        };
        let mut prepare = json!({
            "config": spec.config,
            "shares": spec.shares,
            "reservation": spec.reservation,
        });
        if let Some(l) = spec.limit {
            prepare["limit"] = json!(l);
        }
        if copy {
            prepare["copy_disks"] = json!(true);
            if let Some(d) = &req.datastore {
                prepare["datastore"] = json!(d);
            }
        }
        let answered = match call(
            "POST",
            &format!("/v1/vms/{name}/incoming"),
            Some(&prepare.to_string()),
        ) {
            Ok((201, b)) => b,
            Ok((s, b)) => {
                return error(
                    502,
                    format!(
                        "the target daemon at {} refused the VM (HTTP {s}): {}",
                        req.to,
                        message(&b)
                    ),
                )
            }
            Err(e) => {
                return error(
                    502,
                    format!("cannot reach the target daemon at {}: {e}", req.to),
                )
            }
        };
        let abandon = |why: Reply| -> Reply {
            match call("DELETE", &format!("/v1/vms/{name}"), None) {
                Ok((204 | 404, _)) => {}
                Ok((s, b)) => eprintln!(
                    "wv host: VM '{name}': removing its incoming VM at {}: HTTP {s}: {}",
                    req.to,
                    message(&b)
                ),
                Err(e) => eprintln!(
                    "wv host: VM '{name}': removing its incoming VM at {}: {e}",
                    req.to
                ),
            }
            why
        };
        let answered: serde_json::Value = serde_json::from_str(&answered).unwrap_or_default();
        let Some(destination) = answered["address"]
            .as_str()
            .and_then(|a| reachable(a, host))
        else {
            return abandon(error(
                502,
                format!(
                    "the target daemon at {} answered no address to migrate to: {answered}",
                    req.to
                ),
            ));
        };
        self.migrating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, req.to.clone());
        let mut send = json!({ "destination": destination });
        if let Some(d) = req.downtime_ms {
            send["downtime_ms"] = json!(d);
        }
        if copy {
            send["copy_disks"] = json!(true);
        }
        // A jailed VMM has no route out of its network namespace: the daemon connects for it
        // and hands it the connection.
        let jailed = self
            .lock()
            .worlds
            .iter()
            .find(|w| w.id == id)
            .and_then(|w| w.pid)
            .and_then(super::jail_of)
            .is_some_and(|j| j.net == wv_config::JailNet::New);
        let conn = if jailed {
            match connect_for(&destination) {
                Ok((addr, c)) => {
                    // It is resolved here: the jail has no resolver.
                    send["destination"] = json!(addr.to_string());
                    Some((format!("tcp:{addr}"), c))
                }
                Err(e) => {
                    self.migrating
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    return abandon(error(502, format!("connecting to {destination}: {e}")));
                }
            }
        } else {
            None
        };
        let body = send.to_string();
        let sent = match &conn {
            Some((key, c)) => self.vmm_call_passing(
                name,
                "PUT",
                "/vm/migrate-send",
                Some(&body),
                &[(key.as_str(), std::os::fd::AsFd::as_fd(c))],
            ),
            None => self.vmm_call(name, "PUT", "/vm/migrate-send", Some(&body)),
        };
        drop(conn);
        let numbers = match sent {
            Ok((200, b)) => b,
            Ok((s, b)) => {
                // The VMM refused or failed before the hand-over: the VM runs on here.
                self.migrating
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let status = if (400..500).contains(&s) { s } else { 502 };
                return abandon(error(status, format!("VM '{name}': {}", message(&b))));
            }
            Err(e) => {
                if super::alive_now(&run) {
                    self.migrating
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    return abandon(error(502, format!("VM '{name}': {e}")));
                }
                // Ended without an answer: whether it handed the VM over is the target's
                // to say; nothing there is touched.
                return error(
                    502,
                    format!(
                        "VM '{name}': its VMM ended during the migration without answering ({e}); \
                         the VM may run at {}: look there",
                        req.to
                    ),
                );
            }
        };
        // The VMM ends by itself once it has answered: its end recorded as the migration.
        if !run.wait(STOP_GRACE) {
            eprintln!("wv host: VM '{name}': its VMM did not end after migrating");
        }
        let target_vm = self.target_running(&call, name);
        let mut out: serde_json::Value = serde_json::from_str(&numbers).unwrap_or_default();
        out["to"] = json!(req.to);
        out["target"] = target_vm;
        let doc = self.lock();
        out["vm"] = json!(doc.worlds.iter().find(|w| w.id == id));
        drop(doc);
        ok(200, &out)
    }

    /// The target's record of VM `name` once it is no longer `starting` (or after
    /// [`TARGET_RUNNING_TIMEOUT`]); null if the target cannot be asked.
    fn target_running(&self, call: &TargetCall<'_>, name: &str) -> serde_json::Value {
        let deadline = Instant::now() + TARGET_RUNNING_TIMEOUT;
        loop {
            let vm: serde_json::Value = match call("GET", &format!("/v1/vms/{name}"), None) {
                Ok((200, b)) => serde_json::from_str(&b).unwrap_or_default(),
                _ => return serde_json::Value::Null,
            };
            let starting = vm["state"].as_str() == Some("starting");
            if !starting || Instant::now() > deadline {
                return vm;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A connection to a migration's `destination` (HOST:PORT) made for a jailed VMM, with the
/// address it resolved to (which the VMM is given, and looks the connection up by).
fn connect_for(destination: &str) -> std::io::Result<(std::net::SocketAddr, std::net::TcpStream)> {
    use std::net::ToSocketAddrs;
    let addr = destination.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("'{destination}' names no address"),
        )
    })?;
    let c = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10))?;
    Ok((addr, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_addresses() {
        assert_eq!(host_port("10.0.0.2:7000"), Some(("10.0.0.2", 7000)));
        assert_eq!(host_port("[fd00::2]:7000"), Some(("[fd00::2]", 7000)));
        assert_eq!(host_port("host-b:1"), Some(("host-b", 1)));
        for bad in [
            "", "x", ":80", "h:0", "h:99999", "h:p", "a/b:80", "a b:80", "-h:80", "h\r\n:80",
        ] {
            assert_eq!(host_port(bad), None, "{bad:?}");
        }
        assert_eq!(
            reachable("0.0.0.0:4444", "10.0.0.2").as_deref(),
            Some("10.0.0.2:4444")
        );
        assert_eq!(
            reachable("10.0.0.3:4444", "10.0.0.2").as_deref(),
            Some("10.0.0.3:4444")
        );
        assert_eq!(
            reachable("[::]:4444", "[fd00::2]").as_deref(),
            Some("[fd00::2]:4444")
        );
        assert_eq!(reachable("nonsense", "h"), None);
    }

    #[test]
    fn error_messages_are_unwrapped() {
        assert_eq!(message(r#"{"error":"no"}"#), "no");
        assert_eq!(message("plain\n"), "plain");
    }
}
