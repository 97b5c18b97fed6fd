//! The daemon against docs/openapi.json: every documented operation is exercised on a live
//! daemon, every answer's status must be documented for that operation, and every body must
//! match the documented schema. An operation the document lists but the test does not reach
//! fails the test, so the document cannot drift from the server.

mod common;
use common::daemon::Daemon;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(doc, cur)
        }
        None => v,
    }
}

/// Checks `v` against the subset of JSON Schema the document uses.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) {
    let s = resolve(doc, schema);
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        assert!(e.contains(v), "{at}: {v} not in {e:?}");
    }
    match s.get("type").and_then(Value::as_str) {
        Some("object") => {
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("{at}: {v} is not an object"));
            let props = s["properties"].as_object().cloned().unwrap_or_default();
            for r in s["required"].as_array().into_iter().flatten() {
                assert!(o.contains_key(r.as_str().unwrap()), "{at}: missing {r}");
            }
            for (k, val) in o {
                match props.get(k) {
                    Some(p) => validate(doc, p, val, &format!("{at}.{k}")),
                    None => assert!(
                        s["additionalProperties"] != Value::Bool(false),
                        "{at}: undocumented property {k}"
                    ),
                }
            }
        }
        Some("array") => {
            for (i, item) in v
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array"))
                .iter()
                .enumerate()
            {
                validate(doc, &s["items"], item, &format!("{at}[{i}]"));
            }
        }
        Some("string") => assert!(v.is_string(), "{at}: {v} is not a string"),
        Some("boolean") => assert!(v.is_boolean(), "{at}: {v} is not a boolean"),
        Some("integer") => {
            let n = v
                .as_i64()
                .unwrap_or_else(|| panic!("{at}: {v} is not an integer"));
            if let Some(m) = s["minimum"].as_i64() {
                assert!(n >= m, "{at}: {n} < {m}");
            }
            if let Some(m) = s["maximum"].as_i64() {
                assert!(n <= m, "{at}: {n} > {m}");
            }
        }
        Some("number") => {
            let n = v
                .as_f64()
                .unwrap_or_else(|| panic!("{at}: {v} is not a number"));
            if let Some(m) = s["minimum"].as_f64() {
                assert!(n >= m, "{at}: {n} < {m}");
            }
            if let Some(m) = s["maximum"].as_f64() {
                assert!(n <= m, "{at}: {n} > {m}");
            }
        }
        _ => {}
    }
}

struct Checker {
    doc: Value,
    socket: std::path::PathBuf,
    seen: BTreeSet<(String, String, u16)>,
}

impl Checker {
    /// Sends `method path` (the template is `tpl`), checks the answer against the document.
    fn call(&mut self, method: &str, tpl: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let b = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status: u16 = out.split(' ').nth(1).unwrap().parse().unwrap();
        let text = out.split("\r\n\r\n").nth(1).unwrap_or("");
        let op = &self.doc["paths"][tpl][method.to_lowercase()];
        assert!(op.is_object(), "{method} {tpl} is not documented");
        let resp = resolve(&self.doc, &op["responses"][status.to_string()]);
        assert!(
            resp.is_object(),
            "{method} {tpl} answered {status}, which is not documented: {text}"
        );
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text).unwrap()
        };
        if let Some(schema) = resp.pointer("/content/application~1json/schema") {
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
        (status, json)
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_server_matches_its_openapi_document() {
    need_kvm();
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let dir = TempDir::new("openapi");
    let daemon = Daemon::start(&dir);
    let mut c = Checker {
        doc: doc.clone(),
        socket: daemon.socket.clone(),
        seen: BTreeSet::new(),
    };
    let vm = "/v1/vms/{name}";
    c.call("GET", "/v1/host", "/v1/host", None);
    c.call("GET", "/v1/vms", "/v1/vms", None);
    assert_eq!(
        c.call(
            "POST",
            "/v1/vms",
            "/v1/vms",
            Some(r#"{"name":"a","vcpus":2,"cmdline":"probe.tests=hang"}"#)
        )
        .0,
        201
    );
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
    c.call("GET", "/v1/vms", "/v1/vms", None);
    assert_eq!(c.call("GET", vm, "/v1/vms/a", None).0, 200);
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
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 409);
    // Scheduler settings, live, and the accounting.
    let patch = |c: &mut Checker, path: &str, body: &str| c.call("PATCH", vm, path, Some(body)).0;
    assert_eq!(
        patch(&mut c, "/v1/vms/a", r#"{"shares":2000,"limit":1.5}"#),
        200
    );
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"limit":0}"#), 200);
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"shares":"many"}"#), 400);
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"weight":1}"#), 400);
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
    assert_eq!(patch(&mut c, "/v1/vms/a", r#"{"reservation":1.0}"#), 200);
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/start", "/v1/vms/r/start", None)
            .0,
        200
    );
    assert_eq!(
        patch(&mut c, "/v1/vms/a", r#"{"reservation":1.9}"#),
        409,
        "admission control"
    );
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
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/a/stop", None)
            .0,
        200
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 204);
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 404);
    daemon.stop();
    // Every documented (path, method, status) was produced by the server.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            for status in op["responses"].as_object().unwrap().keys() {
                let s: u16 = status.parse().unwrap();
                assert!(
                    c.seen.contains(&(path.clone(), method.clone(), s)),
                    "{method} {path} {status} documented but never seen"
                );
            }
        }
    }
}
