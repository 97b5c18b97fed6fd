//! The daemon against docs/openapi.json: every documented operation is exercised on a live
//! daemon, every answer's status must be documented for that operation, and every body must
//! match the documented schema. An operation the document lists but the test does not reach
//! fails the test, so the document cannot drift from the server. A second test drives seeded
//! random sequences of valid and invalid requests generated from the document against a model
//! of the daemon's state, checking every answer against both.

mod common;
use common::daemon::Daemon;
use common::openapi::{documented_methods, matches, pattern, resolve, validate, Atom};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

struct Checker {
    doc: Value,
    socket: std::path::PathBuf,
    seen: BTreeSet<(String, String, u16)>,
}

/// One answer: status and body (JSON, or Null when empty).
struct Answer {
    status: u16,
    json: Value,
}

impl Checker {
    /// Sends `method path` (the template is `tpl`), checks the answer against the document.
    fn call(&mut self, method: &str, tpl: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let a = self.exchange(method, tpl, path, body.map(str::as_bytes));
        (a.status, a.json)
    }

    /// Like [`Checker::call`], with raw body bytes and the headers. A method the document
    /// does not list for `tpl` must be answered 405 with an `Allow` header naming exactly the
    /// documented ones; a `tpl` the document does not have, 404.
    fn exchange(&mut self, method: &str, tpl: &str, path: &str, body: Option<&[u8]>) -> Answer {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let b = body.unwrap_or(b"");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            b.len()
        )
        .into_bytes();
        req.extend_from_slice(b);
        s.write_all(&req).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, text) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<String> = head.lines().skip(1).map(str::to_string).collect();
        let ctype = headers
            .iter()
            .find_map(|h| {
                let (n, v) = h.split_once(':')?;
                n.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        let json: Value = if text.is_empty() || ctype != "application/json" {
            Value::Null
        } else {
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
        };
        let error_schema = serde_json::json!({"$ref": "#/components/schemas/Error"});
        if self.doc["paths"][tpl].is_null() {
            assert_eq!(status, 404, "{method} {path} (undocumented path): {text}");
            validate(
                &self.doc,
                &error_schema,
                &json,
                &format!("{method} {path} 404"),
            );
            return Answer { status, json };
        }
        let op = &self.doc["paths"][tpl][method.to_lowercase()];
        if !op.is_object() {
            assert_eq!(status, 405, "{method} {tpl} is not documented: {text}");
            let allow: BTreeSet<String> = headers
                .iter()
                .find_map(|h| {
                    let (n, v) = h.split_once(':')?;
                    n.eq_ignore_ascii_case("allow").then(|| v.to_string())
                })
                .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow: {head}"))
                .split(',')
                .map(|m| m.trim().to_string())
                .collect();
            assert_eq!(allow, documented_methods(&self.doc, tpl), "{method} {path}");
            validate(
                &self.doc,
                &error_schema,
                &json,
                &format!("{method} {path} 405"),
            );
            return Answer { status, json };
        }
        let resp = resolve(&self.doc, &op["responses"][status.to_string()]);
        assert!(
            resp.is_object(),
            "{method} {tpl} answered {status}, which is not documented: {text}"
        );
        let other = resp["content"]
            .as_object()
            .filter(|c| !c.contains_key("application/json"));
        if let Some(content) = other {
            // A body that is not JSON (GET /metrics): the type as documented.
            assert!(
                content.contains_key(&ctype) && !text.is_empty(),
                "{method} {tpl} {status}: Content-Type '{ctype}' is not documented: {head}"
            );
        } else if let Some(schema) = resp.pointer("/content/application~1json/schema") {
            assert_eq!(ctype, "application/json", "{method} {tpl} {status}");
            validate(
                &self.doc,
                schema,
                &json,
                &format!("{method} {tpl} {status}"),
            );
        } else {
            assert!(
                text.is_empty(),
                "{method} {tpl} {status} documents no body: {text}"
            );
        }
        self.seen
            .insert((tpl.to_string(), method.to_lowercase(), status));
        Answer { status, json }
    }
}

fn document() -> Value {
    common::openapi::document("openapi.json")
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_server_matches_its_openapi_document() {
    need_kvm();
    let doc = document();
    let dir = TempDir::new("openapi");
    let daemon = Daemon::start(&dir);
    let mut c = Checker {
        doc: doc.clone(),
        socket: daemon.socket.clone(),
        seen: BTreeSet::new(),
    };
    let vm = "/v1/vms/{name}";
    // The admission-control case below is built from the host's CPU count, so that it holds
    // on any machine: "a" gets up to 32 vCPUs (one spins, the others halt).
    let cpus = c.call("GET", "/v1/host", "/v1/host", None).1["host_cpus"]
        .as_u64()
        .unwrap() as f64;
    let a_vcpus = cpus.min(32.0);
    c.call("GET", "/v1/vms", "/v1/vms", None);
    // A start that fails on the host is a 500 (documented): here the VMs' folder cannot be
    // made, because a file has its name.
    let vms_dir = daemon.state.join("vms");
    std::fs::write(&vms_dir, b"not a folder").unwrap();
    assert_eq!(
        c.call(
            "POST",
            "/v1/vms",
            "/v1/vms",
            Some(&format!(
                r#"{{"name":"a","vcpus":{a_vcpus},"cmdline":"probe.tests=hang"}}"#
            ))
        )
        .0,
        201
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/a/start", None)
            .0,
        500
    );
    std::fs::remove_file(&vms_dir).unwrap();
    assert_eq!(
        c.call("POST", "/v1/vms", "/v1/vms", Some(r#"{"name":"a"}"#))
            .0,
        409
    );
    assert_eq!(
        c.call(
            "POST",
            "/v1/vms",
            "/v1/vms",
            Some(r#"{"name":"b","vcpus":0}"#)
        )
        .0,
        422
    );
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some("[]")).0, 400);
    // A struct is not taken from an array: the document asks for an object.
    assert_eq!(
        c.call("POST", "/v1/vms", "/v1/vms", Some(r#"["b"]"#)).0,
        400
    );
    c.call("GET", "/v1/vms", "/v1/vms", None);
    // Defaults filled in, and every answer typed.
    let (status, a) = c.call("GET", vm, "/v1/vms/a", None);
    assert_eq!(status, 200);
    assert_eq!(a["spec"]["memory"], 256 << 20, "{a}");
    assert_eq!(
        a["spec"]["kernel"],
        serde_json::json!({"embedded": "pvh"}),
        "{a}"
    );
    // The short forms of a request come back typed; the typed forms are taken as they are.
    let (status, t) = c.call(
        "POST",
        "/v1/vms",
        "/v1/vms",
        Some(r#"{"name":"t","kernel":"/k","memory":"64M","disks":["vmkfs=/ds:web,readonly=on","path=/x.img,id=x"],"nets":["tap=t0,mac=52:54:00:00:00:01"]}"#),
    );
    assert_eq!(status, 201, "{t}");
    let typed = serde_json::json!({
        "name": "t",
        "kernel": {"path": "/k"},
        "cmdline": "console=ttyS0 reboot=k panic=1",
        "memory": 64 << 20,
        "vcpus": 1,
        "rng": true,
        "disks": [
            {"path": "/ds", "vmkfs": "web", "readonly": true, "id": "disk0"},
            {"path": "/x.img", "readonly": false, "id": "x"},
        ],
        "nets": [{"tap": "t0", "mac": "52:54:00:00:00:01"}],
        "shares": 1000,
        "reservation": 0.0,
    });
    assert_eq!(t["spec"], typed);
    let mut again = typed.clone();
    again["name"] = "t2".into();
    let (status, t2) = c.call("POST", "/v1/vms", "/v1/vms", Some(&again.to_string()));
    assert_eq!((status, &t2["spec"]), (201, &again));
    for name in ["/v1/vms/t", "/v1/vms/t2"] {
        assert_eq!(c.call("DELETE", vm, name, None).0, 204);
    }
    // Not of its form: 400; of its form but unusable: 422.
    for (body, want) in [
        (r#"{"name":"b","memory":"lots"}"#, 400),
        (r#"{"name":"b","disks":["nopath"]}"#, 400),
        (r#"{"name":"b","kernel":{"embedded":"nope"}}"#, 422),
        (
            r#"{"name":"b","disks":[{"path":"/x","id":"x"},{"path":"/y","id":"x"}]}"#,
            422,
        ),
    ] {
        assert_eq!(
            c.call("POST", "/v1/vms", "/v1/vms", Some(body)).0,
            want,
            "{body}"
        );
    }
    assert_eq!(c.call("GET", vm, "/v1/vms/zz", None).0, 404);
    for op in ["start", "stop", "pause", "resume"] {
        assert_eq!(
            c.call(
                "POST",
                &format!("{vm}/{op}"),
                &format!("/v1/vms/zz/{op}"),
                None
            )
            .0,
            404
        );
    }
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/a/stop", None)
            .0,
        409
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/resume", "/v1/vms/a/resume", None)
            .0,
        409
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/pause", "/v1/vms/a/pause", None)
            .0,
        409
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/a/start", None)
            .0,
        200
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/a/start", None)
            .0,
        409
    );
    c.call("GET", "/v1/host", "/v1/host", None);
    // The storage service's capacities: the default, one device's own, back to the default.
    let st = "/v1/host/storage";
    let (s, v) = c.call("GET", st, st, None);
    assert_eq!((s, &v["capacity_iops"]), (200, &0.into()), "{v}");
    let (s, v) = c.call("PUT", st, st, Some(r#"{"capacity_iops":500}"#));
    assert_eq!((s, &v["capacity_iops"]), (200, &500.into()), "{v}");
    let (s, v) = c.call(
        "PUT",
        st,
        st,
        Some(r#"{"device":"raw","capacity_iops":100}"#),
    );
    assert_eq!(
        (s, &v["device_capacity"]),
        (
            200,
            &serde_json::json!([{"device": "raw", "capacity_iops": 100}])
        ),
        "{v}"
    );
    for bad in [
        r#"{"device":"raw"}"#,
        r#"{"capacity_iops":null}"#,
        r#"{"device":"ds","capacity_iops":1}"#,
        r#"{"device":"/a b","capacity_iops":1}"#,
        r#"{"capacity_iops":-1}"#,
        r#"{"capacity_iops":1,"x":1}"#,
        "[]",
    ] {
        assert_eq!(c.call("PUT", st, st, Some(bad)).0, 400, "{bad}");
    }
    let (s, v) = c.call(
        "PUT",
        st,
        st,
        Some(r#"{"device":"raw","capacity_iops":null}"#),
    );
    assert_eq!(
        (s, &v["device_capacity"]),
        (200, &serde_json::json!([])),
        "{v}"
    );
    // The lending policy is off here: the worlds' memory is sampled on request.
    let (s, m) = c.call("GET", "/v1/host/memory", "/v1/host/memory", None);
    assert_eq!(
        (s, &m["enabled"]),
        (200, &serde_json::Value::Bool(false)),
        "{m}"
    );
    assert!(
        m["worlds"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == "a")),
        "{m}"
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 409);
    // Scheduler settings, live, and the accounting.
    let patch = |c: &mut Checker, path: &str, body: &str| c.call("PATCH", vm, path, Some(body)).0;
    assert_eq!(
        patch(
            &mut c,
            "/v1/vms/a",
            &format!(r#"{{"shares":2000,"limit":{}}}"#, a_vcpus * 0.75)
        ),
        200
    );
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"limit":0}"#), 200);
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"shares":"many"}"#), 400);
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"weight":1}"#), 400);
    assert_eq!(patch(&mut c, "/v1/vms/a", "[]"), 400);
    assert_eq!(patch(&mut c, "/v1/vms/a", "[1000]"), 400);
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"shares":0}"#), 422);
    assert_eq!(patch(&mut c, "/v1/vms/zz", r#"{"shares":1}"#), 404);
    assert_eq!(
        c.call(
            "POST",
            "/v1/vms",
            "/v1/vms",
            Some(r#"{"name":"r","reservation":0.5,"cmdline":"probe.tests=hang"}"#)
        )
        .0,
        201
    );
    // "r" will reserve 0.5 CPU; fillers (only on hosts of more than 32 CPUs) reserve all
    // but what "a" can still ask for with its vCPUs; then "a" asks for 0.1 CPU too many.
    let mut left = cpus - 0.5;
    let mut fillers = Vec::new();
    while left > a_vcpus - 0.1 {
        let res = (left - (a_vcpus - 0.5)).min(32.0);
        let name = format!("f{}", fillers.len());
        let body = format!(
            r#"{{"name":"{name}","vcpus":32,"reservation":{res},"cmdline":"probe.tests=hang"}}"#
        );
        assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(&body)).0, 201);
        let path = format!("/v1/vms/{name}/start");
        assert_eq!(c.call("POST", "/v1/vms/{name}/start", &path, None).0, 200);
        fillers.push(name);
        left -= res;
    }
    let fits = left.min(1.0);
    assert_eq!(
        patch(&mut c, "/v1/vms/a", &format!(r#"{{"reservation":{fits}}}"#)),
        200
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/r/start", None)
            .0,
        200
    );
    assert_eq!(
        patch(
            &mut c,
            "/v1/vms/a",
            &format!(r#"{{"reservation":{}}}"#, left + 0.1)
        ),
        409,
        "admission control: {cpus} CPUs, {} reserved by others, asking {}",
        cpus - left,
        left + 0.1
    );
    for name in &fillers {
        let path = format!("/v1/vms/{name}/stop");
        assert_eq!(c.call("POST", "/v1/vms/{name}/stop", &path, None).0, 200);
    }
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/r/stop", None)
            .0,
        200
    );
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"reservation":0}"#), 200);
    assert_eq!(c.call("DELETE", vm, "/v1/vms/r", None).0, 204);
    assert_eq!(
        c.call("GET", "/v1/vms/{name}/stats", "/v1/vms/a/stats", None)
            .0,
        200
    );
    assert_eq!(
        c.call("GET", "/v1/vms/{name}/stats", "/v1/vms/zz/stats", None)
            .0,
        404
    );
    assert_eq!(c.call("GET", "/v1/stats", "/v1/stats", None).0, 200);
    assert_eq!(c.call("GET", "/v1/history", "/v1/history", None).0, 200);
    assert_eq!(c.call("GET", "/metrics", "/metrics", None).0, 200);
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/pause", "/v1/vms/a/pause", None)
            .0,
        200
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/resume", "/v1/vms/a/resume", None)
            .0,
        200
    );
    snapshot_operations(&mut c, &daemon, &dir);
    migration_operations(&mut c);
    network_operations(&mut c);
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/a/stop", None)
            .0,
        200
    );
    // Methods a path does not support: 405 with Allow (checked by the Checker).
    for (method, tpl, path) in [
        ("DELETE", "/v1/host", "/v1/host"),
        ("GET", "/v1/host/shutdown", "/v1/host/shutdown"),
        ("PUT", "/v1/vms", "/v1/vms"),
        ("POST", vm, "/v1/vms/a"),
        ("GET", "/v1/vms/{name}/start", "/v1/vms/a/start"),
        ("POST", "/metrics", "/metrics"),
        ("GET", "/v1/vms/{name}/snapshot", "/v1/vms/a/snapshot"),
        ("DELETE", "/v1/vms/{name}/restore", "/v1/vms/a/restore"),
        ("POST", "/v1/snapshots", "/v1/snapshots"),
        ("GET", "/v1/snapshots/{snap}", "/v1/snapshots/s1"),
        (
            "GET",
            "/v1/snapshots/{snap}/clone",
            "/v1/snapshots/s1/clone",
        ),
    ] {
        assert_eq!(c.call(method, tpl, path, None).0, 405);
    }
    // A running VM's balloon: its memory target, set live and followed by the guest.
    let bl = "/v1/vms/{name}/balloon";
    let def = r#"{"name":"bl","memory":"64M","balloon":true,"cmdline":"console=ttyS0 probe.tests=balloon probe.balloon_mib=16"}"#;
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(def)).0, 201);
    let target = |c: &mut Checker, path: &str, body: &str| c.call("PUT", bl, path, Some(body)).0;
    assert_eq!(c.call("GET", bl, "/v1/vms/zz/balloon", None).0, 404);
    assert_eq!(
        target(&mut c, "/v1/vms/zz/balloon", r#"{"memory_target":"32M"}"#),
        404
    );
    let (st, e) = c.call("GET", bl, "/v1/vms/bl/balloon", None);
    assert_eq!(st, 409, "{e}");
    assert_eq!(
        target(&mut c, "/v1/vms/bl/balloon", r#"{"memory_target":"32M"}"#),
        409
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/bl/start", None)
            .0,
        200
    );
    for bad in [
        "[]",
        "{}",
        r#"{"memory_target":"lots"}"#,
        r#"{"memory_target":-1}"#,
        r#"{"memory_target":"32M","colour":"red"}"#,
    ] {
        assert_eq!(target(&mut c, "/v1/vms/bl/balloon", bad), 400, "{bad}");
    }
    assert_eq!(
        target(&mut c, "/v1/vms/bl/balloon", r#"{"memory_target":"65M"}"#),
        422
    );
    let (st, b) = c.call(
        "PUT",
        bl,
        "/v1/vms/bl/balloon",
        Some(r#"{"memory_target":"56M"}"#),
    );
    assert_eq!(
        (st, &b["memory_target_bytes"]),
        (200, &serde_json::json!(56 << 20)),
        "{b}"
    );
    let end = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (st, b) = c.call("GET", bl, "/v1/vms/bl/balloon", None);
        assert_eq!(st, 200, "{b}");
        if b["current_bytes"] == 56 << 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the guest never inflated: {b}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/bl/stop", None)
            .0,
        200
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/bl", None).0, 204);
    // Hot-plug through the daemon: a disk handed to a running guest that uses it and ejects it.
    let (dv, dv1) = ("/v1/vms/{name}/devices", "/v1/vms/{name}/devices/{id}");
    let img = daemon.state.join("hot.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let add = serde_json::json!({"disk": {"path": img, "id": "hot0"}}).to_string();
    let root = daemon.state.join("root.img");
    std::fs::write(&root, vec![0u8; 1 << 20]).unwrap();
    let def = serde_json::json!({
        "name": "hp",
        "memory": "64M",
        "disks": [{"path": root, "id": "root"}],
        "cmdline": "console=ttyS0 probe.tests=hotplug probe.hotplug_cycles=2",
    })
    .to_string();
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(&def)).0, 201);
    assert_eq!(c.call("POST", dv, "/v1/vms/zz/devices", Some(&add)).0, 404);
    assert_eq!(c.call("POST", dv, "/v1/vms/hp/devices", Some(&add)).0, 409);
    assert_eq!(
        c.call("DELETE", dv1, "/v1/vms/zz/devices/hot0", None).0,
        404
    );
    // Of a VM that does not run, a remove edits the definition: it has no such device.
    assert_eq!(
        c.call("DELETE", dv1, "/v1/vms/hp/devices/hot0", None).0,
        404
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/hp/start", None)
            .0,
        200
    );
    for bad in ["[]", "{}", r#"{"disk":{"path":"/x"}}"#, r#"{"net":{}}"#] {
        assert_eq!(
            c.call("POST", dv, "/v1/vms/hp/devices", Some(bad)).0,
            400,
            "{bad}"
        );
    }
    let both =
        serde_json::json!({"disk": {"path": img, "id": "a"}, "net": {"network": "n2", "id": "b"}});
    for bad in [r#"{"net":{"network":"n2"}}"#, &both.to_string()] {
        assert_eq!(
            c.call("POST", dv, "/v1/vms/hp/devices", Some(bad)).0,
            400,
            "{bad}"
        );
    }
    let vmkfs = r#"{"disk":{"path":"/x","vmkfs":"d","id":"v"}}"#;
    assert_eq!(c.call("POST", dv, "/v1/vms/hp/devices", Some(vmkfs)).0, 422);
    // A net: on no network; on network n2 (network_operations left it) into a VM whose memory
    // is its own (it has no net), which the VMM refuses and the daemon's port goes again.
    let nosuch = r#"{"net":{"network":"nosuch","id":"n1"}}"#;
    assert_eq!(
        c.call("POST", dv, "/v1/vms/hp/devices", Some(nosuch)).0,
        422
    );
    let private = r#"{"net":{"network":"n2","id":"n1"}}"#;
    let (st, b) = c.call("POST", dv, "/v1/vms/hp/devices", Some(private));
    assert_eq!(st, 422, "{b}");
    assert!(b.to_string().contains("shared"), "{b}");
    let (_, n2) = c.call("GET", "/v1/networks/{net}", "/v1/networks/n2", None);
    assert_eq!(
        n2["ports"],
        serde_json::json!([]),
        "the refused net's port stayed"
    );
    let console = daemon.state.join("vms/hp/console.log");
    let seen = |what: &str| {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains(what)
        {
            assert!(
                std::time::Instant::now() < end,
                "no '{what}' from the guest"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    seen("hotplug: ready");
    let (st, b) = c.call("POST", dv, "/v1/vms/hp/devices", Some(&add));
    assert_eq!(st, 201, "{b}");
    seen("blk hot0 rw-ok");
    // Kept in the definition, and among the run's hot-plugged devices (World.hot).
    let (st, v) = c.call("GET", vm, "/v1/vms/hp", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["spec"]["disks"][1]["id"], "hot0", "{v}");
    assert_eq!(v["hot"][0]["id"], "hot0", "{v}");
    assert_eq!(
        c.call("DELETE", dv1, "/v1/vms/hp/devices/hot0", None).0,
        204
    );
    seen("hotplug: ejected");
    let (_, v) = c.call("GET", vm, "/v1/vms/hp", None);
    assert_eq!(v["spec"]["disks"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(v.get("hot").is_none(), "{v}");
    // A device the run started with is not ejected live.
    assert_eq!(
        c.call("DELETE", dv1, "/v1/vms/hp/devices/root", None).0,
        409
    );
    // The VMM takes a device but the state cannot be saved: 500, the device in the guest but
    // not in the definition; removed all the same.
    let tmp = daemon.state.join("worlds.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let add1 = serde_json::json!({"disk": {"path": img, "id": "hot1"}}).to_string();
    let (st, b) = c.call("POST", dv, "/v1/vms/hp/devices", Some(&add1));
    std::fs::remove_dir(&tmp).unwrap();
    assert_eq!(st, 500, "{b}");
    seen("blk hot1 rw-ok");
    let (_, v) = c.call("GET", vm, "/v1/vms/hp", None);
    assert_eq!(v["spec"]["disks"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        c.call("DELETE", dv1, "/v1/vms/hp/devices/hot1", None).0,
        204
    );
    // With one cycle the guest powers off after its eject: stopped by itself, or stopped here
    // if it has not yet (a stop then answers 409 once it has).
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = c.call("GET", vm, "/v1/vms/hp", None);
        assert_eq!(st, 200, "{v}");
        if v["state"] == "stopped" {
            break;
        }
        assert!(std::time::Instant::now() < end, "hp never stopped: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stopped: a device leaves the definition (500 and unchanged when the state cannot be
    // saved).
    std::fs::create_dir(&tmp).unwrap();
    let (st, b) = c.call("DELETE", dv1, "/v1/vms/hp/devices/root", None);
    std::fs::remove_dir(&tmp).unwrap();
    assert_eq!(st, 500, "{b}");
    assert_eq!(
        c.call("DELETE", dv1, "/v1/vms/hp/devices/root", None).0,
        204
    );
    let (_, v) = c.call("GET", vm, "/v1/vms/hp", None);
    assert_eq!(v["spec"]["disks"].as_array().map_or(0, Vec::len), 0, "{v}");
    assert_eq!(c.call("DELETE", vm, "/v1/vms/hp", None).0, 204);
    device_path_operations(&mut c);
    // The state cannot be saved (a folder has the temporary file's name): 500, and nothing
    // changes.
    let tmp = daemon.state.join("worlds.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(
        c.call("POST", "/v1/vms", "/v1/vms", Some(r#"{"name":"z"}"#))
            .0,
        500
    );
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"shares":3}"#), 500);
    assert_eq!(
        c.call(
            "POST",
            "/v1/vms/{name}/incoming",
            "/v1/vms/z/incoming",
            Some(r#"{"config":{}}"#)
        )
        .0,
        500
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 500);
    let (nets, net) = ("/v1/networks", "/v1/networks/{net}");
    assert_eq!(c.call("POST", nets, nets, Some(r#"{"name":"n9"}"#)).0, 500);
    assert_eq!(c.call("DELETE", net, "/v1/networks/n2", None).0, 500);
    std::fs::remove_dir(&tmp).unwrap();
    assert_eq!(c.call("GET", net, "/v1/networks/n9", None).0, 404);
    assert_eq!(c.call("DELETE", net, "/v1/networks/n2", None).0, 204);
    assert_eq!(c.call("GET", vm, "/v1/vms/z", None).0, 404);
    assert_eq!(
        c.call("GET", vm, "/v1/vms/a", None).1["spec"]["shares"],
        2000
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 204);
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 404);
    // The end: a VM still running is stopped, then the daemon ends, its socket gone.
    let hang = r#"{"name":"b","cmdline":"probe.tests=hang"}"#;
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(hang)).0, 201);
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/b/start", None)
            .0,
        200
    );
    let (s, end) = c.call("POST", "/v1/host/shutdown", "/v1/host/shutdown", None);
    assert_eq!(s, 200, "{end}");
    assert_eq!(end["stopped"], serde_json::json!(["b"]), "{end}");
    assert!(!daemon.socket.exists(), "the socket outlived the shutdown");
    daemon.stop();
    // What no test here can provoke: a VMM that survives SIGKILL, a snapshot folder root
    // cannot remove.
    let unreachable = [
        ("/v1/vms/{name}/stop", "post", 500),
        ("/v1/snapshots/{snap}", "delete", 500),
        // A storage service that dies between the daemon's check and its request.
        ("/v1/host/storage", "put", 502),
    ];
    // Every documented (path, method, status) was produced by the server.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            for status in op["responses"].as_object().unwrap().keys() {
                let s: u16 = status.parse().unwrap();
                if unreachable.contains(&(path.as_str(), method.as_str(), s)) {
                    continue;
                }
                assert!(
                    c.seen.contains(&(path.clone(), method.clone(), s)),
                    "{method} {path} {status} documented but never seen"
                );
            }
        }
    }
}

/// The network operations, every documented status of each but the 500s (which the state
/// that cannot be saved gives, in the caller): networks made, refused, shown, in use and
/// deleted. Leaves network `n2`, unused.
fn network_operations(c: &mut Checker) {
    let (nets, net) = ("/v1/networks", "/v1/networks/{net}");
    assert_eq!(
        c.call("GET", nets, nets, None),
        (200, serde_json::json!([]))
    );
    let (s, v) = c.call("POST", nets, nets, Some(r#"{"name":"lan"}"#));
    assert_eq!((s, v), (201, serde_json::json!({"name": "lan"})));
    assert_eq!(c.call("POST", nets, nets, Some(r#"{"name":"lan"}"#)).0, 409);
    assert_eq!(c.call("POST", nets, nets, Some(r#"{"name":".x"}"#)).0, 422);
    assert_eq!(
        c.call("POST", nets, nets, Some(r#"{"name":"x","uplink":"a/b"}"#))
            .0,
        422
    );
    assert_eq!(c.call("POST", nets, nets, Some(r#"{"nam":"x"}"#)).0, 400);
    assert_eq!(c.call("POST", nets, nets, Some("[]")).0, 400);
    assert_eq!(c.call("POST", nets, nets, Some(r#"{"name":"n2"}"#)).0, 201);
    assert_eq!(
        c.call("GET", nets, nets, None).1.as_array().unwrap().len(),
        2
    );
    // A VM on lan: lan is in use.
    let spec = r#"{"name":"on-lan","nets":[{"network":"lan","mac":"52:54:00:00:00:77"}]}"#;
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(spec)).0, 201);
    let nowhere = r#"{"name":"nowhere","nets":["network=none-such"]}"#;
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(nowhere)).0, 422);
    let (s, v) = c.call("GET", net, "/v1/networks/lan", None);
    assert_eq!(s, 200);
    assert_eq!(v["vms"], serde_json::json!(["on-lan"]), "{v}");
    assert_eq!(c.call("GET", net, "/v1/networks/zz", None).0, 404);
    assert_eq!(c.call("DELETE", net, "/v1/networks/lan", None).0, 409);
    assert_eq!(c.call("DELETE", net, "/v1/networks/zz", None).0, 404);
    assert_eq!(
        c.call("DELETE", "/v1/vms/{name}", "/v1/vms/on-lan", None).0,
        204
    );
    assert_eq!(c.call("DELETE", net, "/v1/networks/lan", None).0, 204);
    for (method, tpl, path) in [("PUT", nets, nets), ("POST", net, "/v1/networks/n2")] {
        assert_eq!(c.call(method, tpl, path, None).0, 405);
    }
}

/// A running VM's NIC on a daemon network switched to the interposed path (with a capture
/// in its folder) and back, and what is refused.
fn device_path_operations(c: &mut Checker) {
    let tpl = "/v1/vms/{name}/devices/{dev}/path";
    let (nets, vm) = ("/v1/networks", "/v1/vms/{name}");
    assert_eq!(c.call("POST", nets, nets, Some(r#"{"name":"pn"}"#)).0, 201);
    let def = r#"{"name":"pv","memory":"64M","nets":[{"network":"pn","mac":"52:54:00:00:00:78","id":"net0"}],"cmdline":"console=ttyS0 probe.tests=netpeer probe.ip=10.87.0.2"}"#;
    assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(def)).0, 201);
    let put = |c: &mut Checker, path: &str, body: &str| c.call("PUT", tpl, path, Some(body));
    let direct = r#"{"path":"direct"}"#;
    assert_eq!(put(c, "/v1/vms/zz/devices/net0/path", direct).0, 404);
    let (st, e) = put(c, "/v1/vms/pv/devices/net0/path", direct);
    assert_eq!(st, 409, "not running: {e}");
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/pv/start", None)
            .0,
        200
    );
    for bad in [
        "[]",
        "{}",
        r#"{"path":"sideways"}"#,
        r#"{"path":"direct","capture":"pv.pcap"}"#,
        r#"{"path":"interposed","capture":"../pv.pcap"}"#,
        r#"{"path":"interposed","capture":"config.json"}"#,
        r#"{"path":"direct","colour":"red"}"#,
    ] {
        assert_eq!(put(c, "/v1/vms/pv/devices/net0/path", bad).0, 400, "{bad}");
    }
    let (st, e) = put(c, "/v1/vms/pv/devices/nosuch/path", direct);
    assert_eq!(st, 404, "{e}");
    let (st, v) = put(
        c,
        "/v1/vms/pv/devices/net0/path",
        r#"{"path":"interposed","capture":"pv.pcap"}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["path"], "interposed", "{v}");
    assert!(
        v["capture"].as_str().unwrap().ends_with("/pv/pv.pcap"),
        "{v}"
    );
    let (st, v) = put(c, "/v1/vms/pv/devices/net0/path", direct);
    assert_eq!((st, &v["path"]), (200, &serde_json::json!("direct")), "{v}");
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/pv/stop", None)
            .0,
        200
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/pv", None).0, 204);
    assert_eq!(
        c.call("DELETE", "/v1/networks/{net}", "/v1/networks/pn", None)
            .0,
        204
    );
    for m in ["GET", "POST", "DELETE"] {
        assert_eq!(c.call(m, tpl, "/v1/vms/pv/devices/net0/path", None).0, 405);
    }
}

/// The migration operations, every documented status of each: this daemon as the target of
/// incoming VMs, and as the source of a migration to a second daemon on loopback (its API
/// on TCP with its token).
fn migration_operations(c: &mut Checker) {
    let (inc, mig) = ("/v1/vms/{name}/incoming", "/v1/vms/{name}/migrate");
    let post =
        |c: &mut Checker, tpl: &str, path: &str, body: &str| c.call("POST", tpl, path, Some(body));
    // Incoming: malformed, refused, waiting (then called off), failing to listen.
    for body in [
        "[]",
        "{}",
        r#"{"config":[]}"#,
        r#"{"config":{},"colour":1}"#,
        r#"{"config":{"name":"x"}}"#,
        r#"{"config":{"memory":"lots"}}"#,
        r#"{"config":{},"listen":7}"#,
    ] {
        assert_eq!(post(c, inc, "/v1/vms/i/incoming", body).0, 400, "{body}");
    }
    for body in [
        r#"{"config":{},"listen":"nowhere"}"#,
        r#"{"config":{"vcpus":0}}"#,
        r#"{"config":{"disks":["path=/dev/null"]}}"#,
        // Not this host's address: the VMM cannot listen, and the VM goes with it.
        r#"{"config":{},"listen":"192.0.2.1:0"}"#,
    ] {
        assert_eq!(post(c, inc, "/v1/vms/i/incoming", body).0, 422, "{body}");
        assert_eq!(c.call("GET", "/v1/vms/{name}", "/v1/vms/i", None).0, 404);
    }
    assert_eq!(
        post(c, inc, "/v1/vms/a/incoming", r#"{"config":{}}"#).0,
        409
    );
    let (status, v) = post(
        c,
        inc,
        "/v1/vms/i/incoming",
        r#"{"config":{"memory":"64M"},"listen":"127.0.0.1:0"}"#,
    );
    assert_eq!(status, 201, "{v}");
    assert!(
        v["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{v}"
    );
    assert_eq!(v["vm"]["state"], "starting", "{v}");
    // Called off: the VMM ends and the VM is gone.
    assert_eq!(c.call("DELETE", "/v1/vms/{name}", "/v1/vms/i", None).0, 204);
    assert_eq!(c.call("GET", "/v1/vms/{name}", "/v1/vms/i", None).0, 404);

    // Migrate: to a second daemon on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("127.0.0.1:{port}");
    let dir2 = TempDir::new("openapi-target");
    let target = Daemon::start_with(&dir2, &["--listen", &to]);
    let token = std::fs::read_to_string(target.state.join("api-token")).unwrap();
    let body = |to: &str, token: &str| serde_json::json!({ "to": to, "token": token }).to_string();
    for b in [
        "[]".to_string(),
        r#"{"to":"x"}"#.to_string(),
        r#"{"to":1,"token":"t"}"#.to_string(),
        r#"{"to":"h:1","token":"t","colour":1}"#.to_string(),
        r#"{"to":"h:1","token":"t","downtime_ms":-1}"#.to_string(),
    ] {
        assert_eq!(post(c, mig, "/v1/vms/a/migrate", &b).0, 400, "{b}");
    }
    assert_eq!(
        post(c, mig, "/v1/vms/zz/migrate", &body(&to, &token)).0,
        404
    );
    for b in [body("nowhere", &token), body(&to, ""), body(&to, "a b")] {
        assert_eq!(post(c, mig, "/v1/vms/a/migrate", &b).0, 422, "{b}");
    }
    let create = |c: &mut Checker, spec: &str| {
        assert_eq!(c.call("POST", "/v1/vms", "/v1/vms", Some(spec)).0, 201);
    };
    create(
        c,
        r#"{"name":"mg","memory":"64M","cmdline":"console=ttyS0 probe.tests=hang"}"#,
    );
    assert_eq!(
        post(c, mig, "/v1/vms/mg/migrate", &body(&to, &token)).0,
        409
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/mg/start", None)
            .0,
        200
    );
    // Nobody there, then a wrong token: the VM runs on, nothing is left at the target.
    let (status, e) = post(c, mig, "/v1/vms/mg/migrate", &body("127.0.0.1:1", &token));
    assert_eq!(status, 502, "{e}");
    let (status, e) = post(c, mig, "/v1/vms/mg/migrate", &body(&to, "wrong"));
    assert_eq!(status, 502, "{e}");
    assert!(e["error"].as_str().unwrap().contains("HTTP 401"), "{e}");
    assert_eq!(
        c.call("GET", "/v1/vms/{name}", "/v1/vms/mg", None).1["state"],
        "running"
    );
    let (status, m) = post(c, mig, "/v1/vms/mg/migrate", &body(&to, &token));
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["vm"]["state"], "stopped", "{m}");
    assert_eq!(m["vm"]["reason"], format!("migrated to {to}"), "{m}");
    assert_eq!(m["target"]["state"], "running", "{m}");
    assert_eq!(target.wv(&["vm", "stop", "mg"]).status, Some(0));
    assert_eq!(
        c.call("DELETE", "/v1/vms/{name}", "/v1/vms/mg", None).0,
        204
    );
    target.stop();
}

/// The snapshot operations, every documented status of each, around the running VM "a"
/// (running again at the end, restored from its own snapshot).
fn snapshot_operations(c: &mut Checker, daemon: &Daemon, dir: &TempDir) {
    let (snap, restore) = ("/v1/vms/{name}/snapshot", "/v1/vms/{name}/restore");
    let (one, clone) = ("/v1/snapshots/{snap}", "/v1/snapshots/{snap}/clone");
    let post =
        |c: &mut Checker, tpl: &str, path: &str, body: &str| c.call("POST", tpl, path, Some(body));
    let names = |c: &mut Checker| -> Vec<String> {
        let (status, list) = c.call("GET", "/v1/snapshots", "/v1/snapshots", None);
        assert_eq!(status, 200);
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names(c).is_empty());
    // Not a SnapshotRequest: 400 (before the VM is looked at).
    for body in [
        "",
        "{",
        "[]",
        r#"["s1"]"#,
        "{}",
        r#"{"snapshot":7}"#,
        r#"{"snapshot":null}"#,
        r#"{"snapshot":"s1","colour":1}"#,
        r#"{"snapshot":"s1","allow_raw_disk":"yes"}"#,
    ] {
        assert_eq!(post(c, snap, "/v1/vms/a/snapshot", body).0, 400, "{body}");
    }
    // Of its form, but not a name: 422.
    let too_long = "s".repeat(65);
    for bad in ["", "..", ".s", "-s", "a b", "a/b", "é", too_long.as_str()] {
        let body = serde_json::json!({ "snapshot": bad }).to_string();
        assert_eq!(post(c, snap, "/v1/vms/a/snapshot", &body).0, 422, "{body}");
    }
    assert_eq!(
        post(c, snap, "/v1/vms/zz/snapshot", r#"{"snapshot":"s1"}"#).0,
        404
    );
    // "d" has a raw disk; not running yet: 409.
    let disk = dir.file("d.img", &vec![0; 1 << 20]);
    let d = serde_json::json!({
        "name": "d", "memory": "16M", "cmdline": "probe.tests=hang",
        "disks": [{"path": disk}],
    });
    assert_eq!(post(c, "/v1/vms", "/v1/vms", &d.to_string()).0, 201);
    assert_eq!(
        post(c, snap, "/v1/vms/d/snapshot", r#"{"snapshot":"s1"}"#).0,
        409
    );
    // The snapshots' folder cannot be made (a file has its name): 500.
    let folder = daemon.state.join("snapshots");
    std::fs::write(&folder, b"not a folder").unwrap();
    assert_eq!(
        post(c, snap, "/v1/vms/a/snapshot", r#"{"snapshot":"s1"}"#).0,
        500
    );
    std::fs::remove_file(&folder).unwrap();
    let (status, m) = post(c, snap, "/v1/vms/a/snapshot", r#"{"snapshot":"s1"}"#);
    assert_eq!(status, 201, "{m}");
    assert_eq!(
        (m["name"].as_str(), m["vm"].as_str()),
        (Some("s1"), Some("a"))
    );
    assert_eq!(m["config"]["memory"], 256 << 20, "{m}");
    assert!(m["memory_bytes"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(
        post(c, snap, "/v1/vms/a/snapshot", r#"{"snapshot":"s1"}"#).0,
        409
    );
    // Of a paused VM, which stays paused.
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/pause", "/v1/vms/a/pause", None)
            .0,
        200
    );
    assert_eq!(
        post(c, snap, "/v1/vms/a/snapshot", r#"{"snapshot":"s2"}"#).0,
        201
    );
    assert_eq!(
        c.call("GET", "/v1/vms/{name}", "/v1/vms/a", None).1["state"],
        "paused"
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/resume", "/v1/vms/a/resume", None)
            .0,
        200
    );
    // A raw disk: refused (nothing left behind) unless allowed.
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/d/start", None)
            .0,
        200
    );
    assert_eq!(
        post(c, snap, "/v1/vms/d/snapshot", r#"{"snapshot":"s3"}"#).0,
        422
    );
    assert!(!folder.join("s3").exists());
    assert_eq!(
        post(
            c,
            snap,
            "/v1/vms/d/snapshot",
            r#"{"snapshot":"s3","allow_raw_disk":true}"#
        )
        .0,
        201
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/d/stop", None)
            .0,
        200
    );
    assert_eq!(c.call("DELETE", "/v1/vms/{name}", "/v1/vms/d", None).0, 204);
    assert_eq!(names(c), ["s1", "s2", "s3"]);
    // A record that cannot be read (500), and one whose configuration cannot start (409).
    std::fs::create_dir(folder.join("bad")).unwrap();
    std::fs::write(folder.join("bad/snapshot.json"), b"{").unwrap();
    std::fs::create_dir(folder.join("nogo")).unwrap();
    let mut nogo = m.clone();
    nogo["name"] = "nogo".into();
    nogo["config"]["vcpus"] = 0.into();
    nogo["config"]["memory"] = (8 << 20).into();
    std::fs::write(folder.join("nogo/snapshot.json"), nogo.to_string()).unwrap();

    // Clones (of "a" while it runs: a clone is a VM of its own).
    for body in [
        "",
        "[]",
        r#"["c"]"#,
        "{}",
        r#"{"name":1}"#,
        r#"{"name":"c","count":"2"}"#,
        r#"{"name":"c","count":-1}"#,
        r#"{"name":"c","count":null}"#,
        r#"{"name":"c","colour":1}"#,
    ] {
        assert_eq!(
            post(c, clone, "/v1/snapshots/s1/clone", body).0,
            400,
            "{body}"
        );
    }
    let long = "c".repeat(62);
    for body in [
        r#"{"name":"c","count":0}"#.to_string(),
        r#"{"name":"c","count":65}"#.to_string(),
        r#"{"name":".."}"#.to_string(),
        // c...c-1 to -9 fit in 64 characters, c...c-10 does not: refused before any starts.
        format!(r#"{{"name":"{long}","count":10}}"#),
    ] {
        assert_eq!(
            post(c, clone, "/v1/snapshots/s1/clone", &body).0,
            422,
            "{body}"
        );
    }
    assert_eq!(
        c.call("GET", "/v1/vms/{name}", &format!("/v1/vms/{long}-1"), None)
            .0,
        404
    );
    assert_eq!(
        post(c, clone, "/v1/snapshots/zz/clone", r#"{"name":"c"}"#).0,
        404
    );
    assert_eq!(
        post(c, clone, "/v1/snapshots/s1/clone", r#"{"name":"a"}"#).0,
        409
    );
    assert_eq!(
        post(c, clone, "/v1/snapshots/bad/clone", r#"{"name":"c"}"#).0,
        500
    );
    let (status, clones) = post(
        c,
        clone,
        "/v1/snapshots/s1/clone",
        r#"{"name":"c","count":2}"#,
    );
    assert_eq!(status, 201, "{clones}");
    let clones = clones.as_array().unwrap();
    let clone_names: Vec<&str> = clones
        .iter()
        .map(|w| w["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(clone_names, ["c-1", "c-2"]);
    assert_ne!(clones[0]["pid"], clones[1]["pid"]);
    for w in clones {
        assert_eq!(w["state"], "running", "{w}");
        assert_eq!(w["spec"]["memory"], 256 << 20, "{w}");
    }
    for n in ["c-1", "c-2"] {
        // Still running (a clone that cannot start crashes instead): stopped on request.
        let (status, w) = c.call(
            "POST",
            "/v1/vms/{name}/stop",
            &format!("/v1/vms/{n}/stop"),
            None,
        );
        assert_eq!(status, 200, "{n}: {w}");
        assert_eq!(
            c.call("DELETE", "/v1/vms/{name}", &format!("/v1/vms/{n}"), None)
                .0,
            204
        );
    }

    // Restore into "a": not while it runs.
    for body in [
        "",
        "[]",
        "{}",
        r#"{"snapshot":1}"#,
        r#"{"snapshot":"s1","colour":1}"#,
    ] {
        assert_eq!(post(c, restore, "/v1/vms/a/restore", body).0, 400, "{body}");
    }
    assert_eq!(
        post(c, restore, "/v1/vms/zz/restore", r#"{"snapshot":"s1"}"#).0,
        404
    );
    assert_eq!(
        post(c, restore, "/v1/vms/a/restore", r#"{"snapshot":"s1"}"#).0,
        409
    );
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/a/stop", None)
            .0,
        200
    );
    for missing in ["zz", "..", "a%2Fb"] {
        let body = serde_json::json!({ "snapshot": missing }).to_string();
        assert_eq!(
            post(c, restore, "/v1/vms/a/restore", &body).0,
            404,
            "{body}"
        );
    }
    assert_eq!(
        post(c, restore, "/v1/vms/a/restore", r#"{"snapshot":"bad"}"#).0,
        500
    );
    // A refused restore leaves the VM as it was.
    let before = c.call("GET", "/v1/vms/{name}", "/v1/vms/a", None).1;
    assert_eq!(
        post(c, restore, "/v1/vms/a/restore", r#"{"snapshot":"nogo"}"#).0,
        409
    );
    let after = c.call("GET", "/v1/vms/{name}", "/v1/vms/a", None).1;
    assert_eq!(before, after);
    let (status, w) = post(c, restore, "/v1/vms/a/restore", r#"{"snapshot":"s1"}"#);
    assert_eq!(status, 200, "{w}");
    assert_eq!(
        (w["state"].as_str(), &w["spec"]),
        (Some("running"), &before["spec"])
    );

    // Deleted: a record that cannot be read too; a snapshot a VM runs from goes as well.
    for s in ["bad", "nogo", "s1", "s2", "s3"] {
        assert_eq!(
            c.call("DELETE", one, &format!("/v1/snapshots/{s}"), None).0,
            204
        );
    }
    for s in ["s1", "zz", "..", "a%2Fb"] {
        assert_eq!(
            c.call("DELETE", one, &format!("/v1/snapshots/{s}"), None).0,
            404
        );
    }
    assert!(names(c).is_empty());
    assert_eq!(
        c.call("GET", "/v1/vms/{name}", "/v1/vms/a", None).1["state"],
        "running"
    );
}

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        let x = lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (x * 1000.0).round() / 1000.0
    }
}

/// A name in a path as the server sees it, %-decoded.
fn decoded(name: &str) -> String {
    name.replace("%2F", "/")
        .replace("%2E", ".")
        .replace("%20", " ")
}

/// Whether `s` matches the pattern `atoms`.
fn pattern_ok(atoms: &[Atom], s: &str) -> bool {
    let c: Vec<char> = s.chars().collect();
    matches(atoms, &c)
}

/// A string matching `pattern`, at most `max` characters.
fn from_pattern(rng: &mut Rng, atoms: &[Atom], max: usize) -> String {
    let mut s = String::new();
    for a in atoms {
        let hi = a
            .max
            .min(a.min + 12)
            .min(max.saturating_sub(s.len()).max(a.min));
        for _ in 0..a.min + rng.below(hi - a.min + 1) {
            s.push(*rng.pick(&a.set));
        }
    }
    s
}

/// What the test knows of one VM.
#[derive(Clone, Debug)]
struct ModelVm {
    live: bool,
    paused: bool,
    vcpus: u32,
    reservation: f64,
    limit: Option<f64>,
}

/// A JSON value that breaks `schema` (resolved), and whether the server must refuse it with
/// 422 (a value of the right type out of range) rather than 400 (wrong type, null).
fn violate(rng: &mut Rng, doc: &Value, schema: &Value) -> Value {
    let s = resolve(doc, schema);
    let mut ways: Vec<Value> = Vec::new();
    if let Some(alts) = s.get("oneOf").and_then(Value::as_array) {
        // A type none of the alternatives has, null, or a number below an alternative's
        // minimum.
        let types: Vec<&str> = alts
            .iter()
            .filter_map(|a| resolve(doc, a)["type"].as_str())
            .collect();
        ways.push(if types.contains(&"boolean") {
            serde_json::json!([])
        } else {
            serde_json::json!(true)
        });
        ways.push(Value::Null);
        for a in alts.iter().map(|a| resolve(doc, a)) {
            if let (Some("integer"), Some(m)) = (a["type"].as_str(), a["minimum"].as_i64()) {
                ways.push(serde_json::json!(m - 1));
            }
        }
        return rng.pick(&ways).clone();
    }
    let ty = s["type"].as_str().unwrap_or("");
    // The wrong type, and null where it is not allowed.
    ways.push(match ty {
        "string" => serde_json::json!(7),
        "array" => serde_json::json!("x"),
        "boolean" => serde_json::json!("yes"),
        _ => serde_json::json!("many"),
    });
    if s["nullable"] != Value::Bool(true) {
        ways.push(Value::Null);
    }
    match (ty, s["minimum"].as_i64(), s["minimum"].as_f64()) {
        ("integer", Some(m), _) => ways.push(serde_json::json!(m - 1)),
        (_, _, Some(m)) => ways.push(serde_json::json!(m - 0.5)),
        _ => {}
    }
    match (ty, s["maximum"].as_i64(), s["maximum"].as_f64()) {
        ("integer", Some(m), _) => ways.push(serde_json::json!(m + 1)),
        (_, _, Some(m)) => ways.push(serde_json::json!(m + 1.0)),
        _ => {}
    }
    if let Some(m) = s["maxLength"].as_u64() {
        ways.push(Value::String("x".repeat(usize::try_from(m).unwrap() + 1)));
    }
    if s["minLength"].as_u64().is_some_and(|m| m > 0) {
        ways.push(Value::String(String::new()));
    }
    if s["pattern"].is_string() {
        for bad in ["..", ".", "-x", "a/b", "a b", "é"] {
            ways.push(Value::String(bad.into()));
        }
    }
    if let Some(m) = s["maxItems"].as_u64() {
        ways.push(Value::Array(
            (0..=m)
                .map(|i| Value::String(format!("path=/d{i}")))
                .collect(),
        ));
    }
    rng.pick(&ways).clone()
}

struct Fuzz {
    c: Checker,
    rng: Rng,
    vms: BTreeMap<String, ModelVm>,
    /// Whether the daemon enforces settings (cgroups); without, only defaults can start.
    scheduler: bool,
    name_atoms: Vec<Atom>,
    /// Most VMs running at once (each spins one CPU under its limit).
    max_live: usize,
    /// Calls per (template, method) with a 2xx answer.
    ok: BTreeMap<(String, String), u32>,
    /// The snapshots, and the vCPUs of the VM each was taken of.
    snaps: BTreeMap<String, u32>,
    /// The networks (no VM the model defines uses one).
    nets: BTreeSet<String>,
    /// Bytes of the path of the switch's socket folder (a network's name must leave room
    /// for its ports' socket paths).
    sw_dir: usize,
    step: usize,
}

impl Fuzz {
    /// A snapshot name for a path or body: mostly a known one, else a new valid one, else
    /// garbage.
    fn some_snapshot(&mut self) -> String {
        let known: Vec<String> = self.snaps.keys().cloned().collect();
        match self.rng.below(10) {
            0..=6 if !known.is_empty() => self.rng.pick(&known).clone(),
            0..=8 => self.new_name(),
            _ => self.rng.pick(&["..", ".", "-x", "a%2Fb"]).to_string(),
        }
    }

    /// A network name for a path or body: mostly a known one, else a new valid one, else
    /// garbage.
    fn some_net(&mut self) -> String {
        let known: Vec<String> = self.nets.iter().cloned().collect();
        match self.rng.below(10) {
            0..=5 if !known.is_empty() => self.rng.pick(&known).clone(),
            0..=8 => from_pattern(&mut self.rng, &self.name_atoms, 24),
            _ => self.rng.pick(&["..", ".", ".x", "a%2Fb"]).to_string(),
        }
    }

    /// A step of the network operations, checked against the document and the model.
    fn net_step(&mut self, op: &str, query: &str, at: &str) {
        let (nets, one) = ("/v1/networks", "/v1/networks/{net}");
        match op {
            "net-list" => {
                let a = self.send("GET", nets, &format!("{nets}{query}"), None);
                assert_eq!(a.status, 200, "{at}");
                let got: BTreeSet<String> = a
                    .json
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n["name"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(got, self.nets, "{at}: the networks");
            }
            "net-create" => {
                let name = self.some_net();
                let body = serde_json::json!({ "name": name }).to_string();
                let a = self.send(
                    "POST",
                    nets,
                    &format!("{nets}{query}"),
                    Some(body.as_bytes()),
                );
                let valid = !name.starts_with('.') && !name.contains('%');
                // Its ports' socket paths must fit: DIR/NAME/4294967295-net15.sock.
                let fits = self.sw_dir + 1 + name.len() + 1 + 21 <= 107;
                let want = if !valid || !fits {
                    422
                } else if self.nets.contains(&name) {
                    409
                } else {
                    201
                };
                assert_eq!(a.status, want, "{at}: POST {nets} {body}: {}", a.json);
                if want == 201 {
                    self.nets.insert(name);
                }
            }
            _ => {
                let name = self.some_net();
                let path = format!("/v1/networks/{name}{query}");
                let known = self.nets.contains(&decoded(&name));
                if op == "net-get" {
                    let a = self.send("GET", one, &path, None);
                    assert_eq!(a.status, if known { 200 } else { 404 }, "{at}: GET {path}");
                } else {
                    let a = self.send("DELETE", one, &path, None);
                    assert_eq!(
                        a.status,
                        if known { 204 } else { 404 },
                        "{at}: DELETE {path}"
                    );
                    self.nets.remove(&decoded(&name));
                }
            }
        }
    }

    /// A step of the snapshot operations, checked against the document and the model.
    fn snapshot_step(&mut self, op: &str, query: &str, at: &str) {
        let invalid = self.rng.chance(25);
        match op {
            "snapshots" => {
                let a = self.send(
                    "GET",
                    "/v1/snapshots",
                    &format!("/v1/snapshots{query}"),
                    None,
                );
                assert_eq!(a.status, 200, "{at}");
                let names: Vec<&str> = a
                    .json
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["name"].as_str().unwrap())
                    .collect();
                let model: Vec<&str> = self.snaps.keys().map(String::as_str).collect();
                assert_eq!(names, model, "{at}: the snapshots listed");
            }
            "delete-snapshot" => {
                let snap = self.some_snapshot();
                let path = format!("/v1/snapshots/{snap}{query}");
                let a = self.send("DELETE", "/v1/snapshots/{snap}", &path, None);
                let known = self.snaps.remove(&snap.replace("%2F", "/")).is_some();
                assert_eq!(
                    a.status,
                    if known { 204 } else { 404 },
                    "{at}: DELETE {path}"
                );
            }
            "snapshot" => {
                if self.snaps.len() >= 4 {
                    return self.snapshot_step("delete-snapshot", query, at);
                }
                let live: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|(_, v)| v.live)
                    .map(|(n, _)| n.clone())
                    .collect();
                let name = if !live.is_empty() && self.rng.chance(70) {
                    self.rng.pick(&live).clone()
                } else {
                    self.some_name()
                };
                let snap = if self.rng.chance(80) {
                    self.new_name()
                } else {
                    self.some_snapshot()
                };
                let path = format!("/v1/vms/{name}/snapshot{query}");
                let tpl = "/v1/vms/{name}/snapshot";
                let base = serde_json::json!({ "snapshot": snap });
                if invalid {
                    let body = self.invalid_body("SnapshotRequest", base);
                    let a = self.send("POST", tpl, &path, Some(&body));
                    assert!(
                        a.status == 400 || a.status == 422,
                        "{at}: invalid {:?} answered {}",
                        String::from_utf8_lossy(&body),
                        a.status
                    );
                    return;
                }
                let a = self.send("POST", tpl, &path, Some(base.to_string().as_bytes()));
                let vm = self.vms.get(&decoded(&name));
                let valid = pattern_ok(&self.name_atoms, &snap);
                let want = match vm {
                    _ if !valid => 422,
                    None => 404,
                    Some(v) if !v.live || self.snaps.contains_key(&snap) => 409,
                    Some(_) => 201,
                };
                assert_eq!(a.status, want, "{at}: POST {path} {base}: {}", a.json);
                if want == 201 {
                    let vcpus = vm.unwrap().vcpus;
                    self.snaps.insert(snap, vcpus);
                }
            }
            "restore" => {
                let stopped: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|(_, v)| !v.live)
                    .map(|(n, _)| n.clone())
                    .collect();
                let name = if !stopped.is_empty() && self.rng.chance(70) {
                    self.rng.pick(&stopped).clone()
                } else {
                    self.some_name()
                };
                let known = self.vms.get(&decoded(&name)).cloned();
                if known.as_ref().is_some_and(|v| !v.live) && self.live() >= self.max_live {
                    return;
                }
                let snap = self.some_snapshot();
                let base = serde_json::json!({ "snapshot": snap });
                let (tpl, path) = (
                    "/v1/vms/{name}/restore",
                    format!("/v1/vms/{name}/restore{query}"),
                );
                if invalid {
                    let body = self.invalid_body("RestoreRequest", base);
                    let a = self.send("POST", tpl, &path, Some(&body));
                    // A snapshot that is not a name is not there: 404 (never started).
                    assert!(
                        [400, 404, 409].contains(&a.status),
                        "{at}: invalid {:?} answered {}",
                        String::from_utf8_lossy(&body),
                        a.status
                    );
                    return;
                }
                let a = self.send("POST", tpl, &path, Some(base.to_string().as_bytes()));
                let snap_vcpus = self.snaps.get(&snap).copied();
                let want = match (&known, snap_vcpus) {
                    (None, _) => 404,
                    (Some(v), _) if v.live => 409,
                    (Some(_), None) => 404,
                    (Some(_), Some(_)) => 200,
                };
                assert_eq!(a.status, want, "{at}: POST {path} {base}: {}", a.json);
                if want == 200 {
                    assert_eq!(a.json["state"], "running", "{at}: {}", a.json);
                    let m = self.vms.get_mut(&decoded(&name)).unwrap();
                    (m.live, m.paused) = (true, false);
                    m.vcpus = snap_vcpus.unwrap();
                }
            }
            "clone" => {
                if self.live() >= self.max_live {
                    return;
                }
                let snap = self.some_snapshot();
                let existing = !self.vms.is_empty() && self.rng.chance(10);
                let name = if existing {
                    self.vms.keys().next().unwrap().clone()
                } else {
                    self.new_name()
                };
                let base = serde_json::json!({ "name": name, "count": 1 });
                let (tpl, path) = (
                    "/v1/snapshots/{snap}/clone",
                    format!("/v1/snapshots/{snap}/clone{query}"),
                );
                if invalid {
                    let body = self.invalid_body("CloneRequest", base);
                    let a = self.send("POST", tpl, &path, Some(&body));
                    assert!(
                        [400, 404, 409, 422].contains(&a.status),
                        "{at}: invalid {:?} answered {}",
                        String::from_utf8_lossy(&body),
                        a.status
                    );
                    return;
                }
                let a = self.send("POST", tpl, &path, Some(base.to_string().as_bytes()));
                let snap_vcpus = self.snaps.get(&snap.replace("%2F", "/")).copied();
                let want = match snap_vcpus {
                    None => 404,
                    Some(_) if existing => 409,
                    Some(_) => 201,
                };
                assert_eq!(a.status, want, "{at}: POST {path} {base}: {}", a.json);
                if want != 201 {
                    return;
                }
                assert_eq!(a.json[0]["spec"]["name"], name.as_str(), "{at}: {}", a.json);
                self.vms.insert(
                    name.clone(),
                    ModelVm {
                        live: true,
                        paused: false,
                        vcpus: snap_vcpus.unwrap(),
                        reservation: 0.0,
                        limit: None,
                    },
                );
                // A clone has no limit: given one where the scheduler can, and stopped at once
                // to keep the host cool, which also shows it running.
                if self.scheduler {
                    let path = format!("/v1/vms/{name}");
                    let a = self.send("PATCH", "/v1/vms/{name}", &path, Some(br#"{"limit":0.1}"#));
                    assert_eq!(a.status, 200, "{at}: {}", a.json);
                    self.vms.get_mut(&name).unwrap().limit = Some(0.1);
                }
                self.vm_step_on("stop", &name, "", at);
            }
            _ => unreachable!(),
        }
    }

    fn live(&self) -> usize {
        self.vms.values().filter(|v| v.live).count()
    }

    fn new_name(&mut self) -> String {
        loop {
            let n = from_pattern(&mut self.rng, &self.name_atoms, 64);
            if !self.vms.contains_key(&n) {
                return n;
            }
        }
    }

    /// A name for a path: mostly a known VM, else a new valid one, else garbage.
    fn some_name(&mut self) -> String {
        let known: Vec<String> = self.vms.keys().cloned().collect();
        match self.rng.below(10) {
            0..=6 if !known.is_empty() => self.rng.pick(&known).clone(),
            7 | 8 => self.new_name(),
            _ => self
                .rng
                .pick(&["..", ".", "-x", "a%2Fb", "%2E%2E", "a%20b"])
                .to_string(),
        }
    }

    /// A valid VmSpec: the document's ranges and name pattern, with values chosen so that it
    /// can run here cheaply (the probe guest, small memory, a low CPU limit).
    fn valid_spec(&mut self, name: &str) -> Value {
        let doc = self.c.doc.clone();
        let props = &doc["components"]["schemas"]["VmSpec"]["properties"];
        // Memory and the kernel in their typed and short forms.
        let memory = self
            .rng
            .pick(&[
                serde_json::json!("16M"),
                serde_json::json!("32M"),
                serde_json::json!(64 << 20),
            ])
            .clone();
        let mut spec = serde_json::json!({
            "name": name,
            "cmdline": "probe.tests=hang",
            "memory": memory,
        });
        if self.rng.chance(50) {
            spec["kernel"] = serde_json::json!({"embedded": *self.rng.pick(&["pvh", "bzimage"])});
        }
        let vcpus = 1 + self.rng.below(2) as i64;
        if self.rng.chance(50) {
            spec["vcpus"] = vcpus.into();
        }
        if self.rng.chance(50) {
            spec["rng"] = self.rng.chance(50).into();
        }
        if self.scheduler {
            let (lo, hi) = (
                props["shares"]["minimum"].as_i64().unwrap(),
                props["shares"]["maximum"].as_i64().unwrap(),
            );
            let span = usize::try_from(hi - lo + 1).unwrap();
            spec["shares"] = (lo + i64::try_from(self.rng.below(span)).unwrap()).into();
            let res = if self.rng.chance(50) {
                self.rng.range(0.0, 0.05)
            } else {
                0.0
            };
            spec["reservation"] = res.into();
            spec["limit"] = self.rng.range(res.max(0.05), 0.1).into();
        }
        spec
    }

    /// A body that breaks `schema` in one way: a property the schema forbids, one value
    /// against its schema, or not the JSON object asked for.
    fn invalid_body(&mut self, schema: &str, base: Value) -> Vec<u8> {
        let doc = self.c.doc.clone();
        let s = &doc["components"]["schemas"][schema];
        let props: Vec<String> = s["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut b = base;
        match self.rng.below(10) {
            0 => b["colour"] = "red".into(),
            1 => {
                return self
                    .rng
                    .pick(&["{", "[]", "", "null", "{\"name\":"])
                    .as_bytes()
                    .to_vec()
            }
            2 if schema == "VmSpec" => {
                let f = self.rng.pick(&["cmdline", "kernel", "initrd"]).to_string();
                b[f] = "x\u{0}y".into();
            }
            _ => {
                let p = self.rng.pick(&props).clone();
                b[&p] = violate(&mut self.rng, &doc, &s["properties"][&p]);
            }
        }
        b.to_string().into_bytes()
    }

    /// One exchange, checked against the document by the Checker; returns the answer.
    fn send(&mut self, method: &str, tpl: &str, path: &str, body: Option<&[u8]>) -> Answer {
        let a = self.c.exchange(method, tpl, path, body);
        if (200..300).contains(&a.status) {
            *self
                .ok
                .entry((tpl.to_string(), method.to_lowercase()))
                .or_default() += 1;
        }
        a
    }

    /// One random step, its answer checked against the document and the model.
    fn step(&mut self) {
        self.step += 1;
        let at = format!("step {}", self.step);
        let ops = [
            "create",
            "create",
            "create",
            "list",
            "get",
            "get",
            "stats",
            "all-stats",
            "metrics",
            "history",
            "host",
            "host-memory",
            "host-storage",
            "host-storage-set",
            "patch",
            "patch",
            "delete",
            "start",
            "start",
            "stop",
            "stop",
            "pause",
            "resume",
            "snapshot",
            "snapshot",
            "restore",
            "restore",
            "snapshots",
            "delete-snapshot",
            "clone",
            "clone",
            "net-create",
            "net-create",
            "net-list",
            "net-get",
            "net-delete",
            "wrong-method",
            "unknown-path",
        ];
        let op = *self.rng.pick(&ops);
        let query = if self.rng.chance(10) {
            "?verbose=1&x=%2F"
        } else {
            ""
        };
        match op {
            "host-storage-set" => {
                let n = self.rng.below(1000);
                let st = "/v1/host/storage";
                let body = format!(r#"{{"capacity_iops":{n}}}"#);
                let a = self.send("PUT", st, st, Some(body.as_bytes()));
                assert_eq!(a.status, 200, "{at}: PUT {st}: {}", a.json);
                assert_eq!(a.json["capacity_iops"], n, "{at}: {}", a.json);
            }
            "host" | "host-memory" | "host-storage" | "list" | "all-stats" | "metrics"
            | "history" => {
                let (tpl, path) = match op {
                    "host" => ("/v1/host", "/v1/host"),
                    "host-memory" => ("/v1/host/memory", "/v1/host/memory"),
                    "host-storage" => ("/v1/host/storage", "/v1/host/storage"),
                    "history" => ("/v1/history", "/v1/history"),
                    "list" => ("/v1/vms", "/v1/vms"),
                    "metrics" => ("/metrics", "/metrics"),
                    _ => ("/v1/stats", "/v1/stats"),
                };
                let a = self.send("GET", tpl, &format!("{path}{query}"), None);
                assert_eq!(a.status, 200, "{at}: GET {path}");
                if op == "list" {
                    let names: BTreeSet<&str> = a
                        .json
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|w| w["spec"]["name"].as_str().unwrap())
                        .collect();
                    let model: BTreeSet<&str> = self.vms.keys().map(String::as_str).collect();
                    assert_eq!(names, model, "{at}: the VMs listed");
                }
            }
            "create" => {
                let existing = !self.vms.is_empty() && self.rng.chance(10);
                let name = if existing {
                    self.vms.keys().next().unwrap().clone()
                } else {
                    self.new_name()
                };
                let spec = self.valid_spec(&name);
                if self.rng.chance(35) {
                    let body = self.invalid_body("VmSpec", spec);
                    let a = self.send("POST", "/v1/vms", "/v1/vms", Some(&body));
                    assert!(
                        a.status == 400 || a.status == 422,
                        "{at}: invalid {:?} answered {}",
                        String::from_utf8_lossy(&body),
                        a.status
                    );
                    return;
                }
                let body = spec.to_string();
                let a = self.send("POST", "/v1/vms", "/v1/vms", Some(body.as_bytes()));
                if existing {
                    assert_eq!(a.status, 409, "{at}: {body}");
                    return;
                }
                assert_eq!(a.status, 201, "{at}: {body}: {}", a.json);
                assert_eq!(a.json["state"], "defined", "{at}");
                self.vms.insert(
                    name,
                    ModelVm {
                        live: false,
                        paused: false,
                        vcpus: spec["vcpus"]
                            .as_u64()
                            .map_or(1, |v| u32::try_from(v).unwrap()),
                        reservation: spec["reservation"].as_f64().unwrap_or(0.0),
                        limit: spec["limit"].as_f64(),
                    },
                );
            }
            "wrong-method" => {
                let doc = self.c.doc.clone();
                let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
                let tpl = self.rng.pick(&paths).to_string();
                let allowed = documented_methods(&doc, &tpl);
                let others: Vec<&str> = ["GET", "POST", "PUT", "PATCH", "DELETE"]
                    .into_iter()
                    .filter(|m| !allowed.contains(*m))
                    .collect();
                let Some(&m) = (!others.is_empty()).then(|| self.rng.pick(&others)) else {
                    return;
                };
                let name = self.some_name();
                let snap = self.some_snapshot();
                let path = tpl.replace("{name}", &name).replace("{snap}", &snap);
                let a = self.send(m, &tpl, &format!("{path}{query}"), None);
                assert_eq!(a.status, 405, "{at}: {m} {path}");
            }
            "unknown-path" => {
                // ("/" is the web console's page, not the API's: crates/wv/tests/web.rs.)
                let p = *self.rng.pick(&[
                    "/v1/nope",
                    "/v2/host",
                    "/v1/vms/a/b/c",
                    "/assets/nope",
                    "/v1",
                ]);
                let a = self.send("GET", "/undocumented", &format!("{p}{query}"), None);
                assert_eq!(a.status, 404, "{at}: GET {p}");
            }
            "snapshot" | "restore" | "snapshots" | "delete-snapshot" | "clone" => {
                self.snapshot_step(op, query, &at)
            }
            "net-create" | "net-list" | "net-get" | "net-delete" => self.net_step(op, query, &at),
            _ => self.vm_step(op, query, &at),
        }
    }

    /// A step on one VM (by a name that may or may not exist).
    fn vm_step(&mut self, op: &str, query: &str, at: &str) {
        // Mostly a VM in the state the operation wants, so that every transition is driven.
        let fits: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| match op {
                "stop" | "pause" => v.live && !v.paused,
                "resume" => v.paused,
                "start" => !v.live,
                _ => false,
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut name = if !fits.is_empty() && self.rng.chance(60) {
            self.rng.pick(&fits).clone()
        } else {
            self.some_name()
        };
        if op == "start" && self.live() >= self.max_live {
            // Keep the host cool: stop one instead.
            let Some(n) = self
                .vms
                .iter()
                .find(|(_, v)| v.live)
                .map(|(n, _)| n.clone())
            else {
                return;
            };
            return self.vm_step_on("stop", &n, query, at);
        }
        if name.contains('%') && self.rng.chance(50) {
            name = name.replace('.', "%2E");
        }
        self.vm_step_on(op, &name, query, at);
    }

    fn vm_step_on(&mut self, op: &str, path_name: &str, query: &str, at: &str) {
        // The name the server sees, after %-decoding.
        let name = path_name
            .replace("%2F", "/")
            .replace("%2E", ".")
            .replace("%20", " ");
        let known = self.vms.get(&name).cloned();
        let (method, tpl, path) = match op {
            "get" => (
                "GET",
                "/v1/vms/{name}".to_string(),
                format!("/v1/vms/{path_name}"),
            ),
            "delete" => (
                "DELETE",
                "/v1/vms/{name}".into(),
                format!("/v1/vms/{path_name}"),
            ),
            "patch" => (
                "PATCH",
                "/v1/vms/{name}".into(),
                format!("/v1/vms/{path_name}"),
            ),
            "stats" => (
                "GET",
                "/v1/vms/{name}/stats".into(),
                format!("/v1/vms/{path_name}/stats"),
            ),
            _ => (
                "POST",
                format!("/v1/vms/{{name}}/{op}"),
                format!("/v1/vms/{path_name}/{op}"),
            ),
        };
        let path = format!("{path}{query}");
        if op == "patch" {
            return self.patch(&name, known, &tpl, &path, at);
        }
        let a = self.send(method, &tpl, &path, None);
        let Some(vm) = known else {
            assert_eq!(a.status, 404, "{at}: {method} {path}");
            return;
        };
        let want = |ok: bool| if ok { 200 } else { 409 };
        let expected = match op {
            "get" | "stats" => 200,
            "delete" => {
                if vm.live {
                    409
                } else {
                    204
                }
            }
            "start" => want(!vm.live),
            "stop" => want(vm.live),
            "pause" => want(vm.live && !vm.paused),
            "resume" => want(vm.live && vm.paused),
            _ => unreachable!(),
        };
        assert_eq!(a.status, expected, "{at}: {method} {path}: {}", a.json);
        if (op, a.status) == ("delete", 204) {
            self.vms.remove(&name);
            return;
        }
        let m = self.vms.get_mut(&name).unwrap();
        match (op, a.status) {
            ("start", 200) => (m.live, m.paused) = (true, false),
            ("stop", 200) => {
                assert_eq!(a.json["state"], "stopped", "{at}: {}", a.json);
                (m.live, m.paused) = (false, false);
            }
            ("pause", 200) => m.paused = true,
            ("resume", 200) => m.paused = false,
            _ => {}
        }
        if a.status == 200 && op != "stats" {
            let want = if m.live && m.paused {
                "paused"
            } else if m.live {
                "running"
            } else {
                a.json["state"].as_str().unwrap_or("?")
            };
            assert_eq!(a.json["state"], want, "{at}: {op}: {}", a.json);
        }
    }

    fn patch(&mut self, name: &str, known: Option<ModelVm>, tpl: &str, path: &str, at: &str) {
        let mut body = serde_json::Map::new();
        let vm = known.clone().unwrap_or(ModelVm {
            live: false,
            paused: false,
            vcpus: 1,
            reservation: 0.0,
            limit: None,
        });
        let mut next = vm.clone();
        if self.rng.chance(50) {
            body.insert("shares".into(), (1 + self.rng.below(10_000)).into());
        }
        if self.scheduler && self.rng.chance(50) {
            let cap = vm.limit.unwrap_or(f64::from(vm.vcpus)).min(0.05);
            next.reservation = self.rng.range(0.0, cap);
            body.insert("reservation".into(), next.reservation.into());
        }
        if self.scheduler && self.rng.chance(50) {
            if !vm.live && self.rng.chance(30) {
                next.limit = None;
                let none = if self.rng.chance(50) {
                    Value::Null
                } else {
                    0.into()
                };
                body.insert("limit".into(), none);
            } else {
                let l = self.rng.range(next.reservation.max(0.05), 0.1);
                next.limit = Some(l);
                body.insert("limit".into(), l.into());
            }
        }
        if self.rng.chance(35) {
            let b = self.invalid_body("ResourceUpdate", Value::Object(body));
            let a = self.send("PATCH", tpl, path, Some(&b));
            let ok: &[u16] = if known.is_some() {
                &[400, 422]
            } else {
                &[400, 404, 422]
            };
            assert!(
                ok.contains(&a.status),
                "{at}: invalid PATCH {:?} answered {}",
                String::from_utf8_lossy(&b),
                a.status
            );
            return;
        }
        let b = Value::Object(body).to_string();
        let a = self.send("PATCH", tpl, path, Some(b.as_bytes()));
        if known.is_none() {
            assert_eq!(a.status, 404, "{at}: PATCH {path}");
            return;
        }
        assert_eq!(a.status, 200, "{at}: PATCH {path} {b}: {}", a.json);
        assert_eq!(
            a.json["spec"]["limit"].as_f64(),
            next.limit,
            "{at}: {}",
            a.json
        );
        self.vms.insert(name.to_string(), next);
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn generated_request_sequences_match_the_document_and_the_model() {
    need_kvm();
    let seed = std::env::var("WV_OPENAPI_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_secs() << 30) ^ u64::from(t.subsec_nanos()) | 1
        });
    eprintln!("openapi: seed {seed} (WV_OPENAPI_SEED={seed} replays this run)");
    let doc = document();
    let dir = TempDir::new("openapi-gen");
    let daemon = Daemon::start(&dir);
    let name_atoms = pattern(
        doc["components"]["schemas"]["VmSpec"]["properties"]["name"]["pattern"]
            .as_str()
            .unwrap(),
    );
    let mut f = Fuzz {
        c: Checker {
            doc: doc.clone(),
            socket: daemon.socket.clone(),
            seen: BTreeSet::new(),
        },
        rng: Rng(seed),
        vms: BTreeMap::new(),
        scheduler: false,
        name_atoms,
        max_live: 1,
        ok: BTreeMap::new(),
        snaps: BTreeMap::new(),
        nets: BTreeSet::new(),
        sw_dir: daemon.state.join("sw").as_os_str().len(),
        step: 0,
    };
    let host = f.send("GET", "/v1/host", "/v1/host", None).json;
    f.scheduler = !host["scheduler"]
        .as_str()
        .unwrap()
        .starts_with("unavailable");
    // With the scheduler every VM runs under a limit of 0.1 CPU at most; without, each spins
    // a whole CPU, so one at a time.
    f.max_live = if f.scheduler { 3 } else { 1 };
    let (steps, budget) = (400, Duration::from_secs(60));
    let t = Instant::now();
    while f.step < steps && t.elapsed() < budget {
        f.step();
    }
    eprintln!(
        "openapi: seed {seed}: {} steps in {:?}, {} VMs at the end, 2xx per operation {:?}",
        f.step,
        t.elapsed(),
        f.vms.len(),
        f.ok
    );
    let live: Vec<String> = f
        .vms
        .iter()
        .filter(|(_, v)| v.live)
        .map(|(n, _)| n.clone())
        .collect();
    for n in live {
        let path = format!("/v1/vms/{n}/stop");
        assert_eq!(
            f.send("POST", "/v1/vms/{name}/stop", &path, None).status,
            200
        );
    }
    // A VM's life and its snapshot's once more, in an order that makes each succeed whatever
    // the seed drew (a clone needs a snapshot, which needs a running VM; a restore needs a
    // stopped VM). Every VM the model made is stopped by now.
    let spec = f.valid_spec("zz-end").to_string();
    let vm = |op: &str| {
        (
            format!("/v1/vms/{{name}}{op}"),
            format!("/v1/vms/zz-end{op}"),
        )
    };
    let must = |f: &mut Fuzz, method: &str, (tpl, path): (String, String), body: &str| {
        let a = f.send(
            method,
            &tpl,
            &path,
            (!body.is_empty()).then_some(body.as_bytes()),
        );
        assert!(
            (200..300).contains(&a.status),
            "seed {seed}: {method} {path} {body}: {} {}",
            a.status,
            a.json
        );
    };
    let snap = r#"{"snapshot":"zz-snap"}"#;
    must(&mut f, "POST", ("/v1/vms".into(), "/v1/vms".into()), &spec);
    for op in ["/start", "/pause", "/resume"] {
        must(&mut f, "POST", vm(op), "");
    }
    must(&mut f, "POST", vm("/snapshot"), snap);
    let clone = (
        "/v1/snapshots/{snap}/clone".to_string(),
        "/v1/snapshots/zz-snap/clone".to_string(),
    );
    must(&mut f, "POST", clone, r#"{"name":"zz-clone","count":1}"#);
    let stop = ("/v1/vms/{name}/stop".into(), "/v1/vms/zz-clone/stop".into());
    must(&mut f, "POST", stop, "");
    must(&mut f, "POST", vm("/stop"), "");
    must(&mut f, "POST", vm("/restore"), snap);
    must(&mut f, "POST", vm("/stop"), "");
    let one_snap = (
        "/v1/snapshots/{snap}".into(),
        "/v1/snapshots/zz-snap".into(),
    );
    must(&mut f, "DELETE", one_snap, "");
    // Each network operation once more, so that every one has succeeded whatever the seed
    // drew (the model's VMs use no network: an unused one always goes).
    let (nets, one) = ("/v1/networks", "/v1/networks/{net}");
    if !f.nets.contains("zz-last") {
        let a = f.send("POST", nets, nets, Some(br#"{"name":"zz-last"}"#));
        assert_eq!(a.status, 201, "seed {seed}: {}", a.json);
    }
    assert_eq!(f.send("GET", nets, nets, None).status, 200);
    assert_eq!(f.send("GET", one, "/v1/networks/zz-last", None).status, 200);
    assert_eq!(
        f.send("DELETE", one, "/v1/networks/zz-last", None).status,
        204
    );
    daemon.stop();
    assert!(f.step >= 100, "seed {seed}: only {} steps ran", f.step);
    // Every documented operation was driven to success at least once, but those that need
    // a second daemon (the_server_matches_its_openapi_document drives them to success).
    // (The shutdown ends the daemon: the_server_matches_its_openapi_document drives it, and
    // the balloon, which needs a VM defined with one and a guest that drives it.)
    // (A device's path too: it needs a running VM on a network, which
    // the_server_matches_its_openapi_document switches.)
    let two_daemons = [
        "/v1/vms/{name}/balloon",
        "/v1/vms/{name}/devices",
        "/v1/vms/{name}/devices/{id}",
        "/v1/vms/{name}/devices/{dev}/path",
        "/v1/vms/{name}/incoming",
        "/v1/vms/{name}/migrate",
        "/v1/host/shutdown",
    ];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" && !two_daemons.contains(&path.as_str()) {
                assert!(
                    f.ok.contains_key(&(path.clone(), method.clone())),
                    "seed {seed}: {method} {path} never succeeded"
                );
            }
        }
    }
}
