//! The daemon against docs/openapi.json: every documented operation is exercised on a live
//! daemon, every answer's status must be documented for that operation, and every body must
//! match the documented schema. An operation the document lists but the test does not reach
//! fails the test, so the document cannot drift from the server. A second test drives seeded
//! random sequences of valid and invalid requests generated from the document against a model
//! of the daemon's state, checking every answer against both.

mod common;
use common::daemon::Daemon;
use common::openapi::{documented_methods, pattern, resolve, Answer, Atom, Checker};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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
    let mut c = Checker::new(doc.clone(), daemon.socket.clone());
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
    assert_eq!(
        c.call("POST", "/v1/vms/{name}/stop", "/v1/vms/a/stop", None)
            .0,
        200
    );
    // Methods a path does not support: 405 with Allow (checked by the Checker).
    for (method, tpl, path) in [
        ("DELETE", "/v1/host", "/v1/host"),
        ("PUT", "/v1/vms", "/v1/vms"),
        ("POST", vm, "/v1/vms/a"),
        ("GET", "/v1/vms/{name}/start", "/v1/vms/a/start"),
        ("POST", "/metrics", "/metrics"),
    ] {
        assert_eq!(c.call(method, tpl, path, None).0, 405);
    }
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
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 500);
    std::fs::remove_dir(&tmp).unwrap();
    assert_eq!(c.call("GET", vm, "/v1/vms/z", None).0, 404);
    assert_eq!(
        c.call("GET", vm, "/v1/vms/a", None).1["spec"]["shares"],
        2000
    );
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 204);
    assert_eq!(c.call("DELETE", vm, "/v1/vms/a", None).0, 404);
    daemon.stop();
    // What no test here can provoke: a VMM that survives SIGKILL.
    let unreachable = [("/v1/vms/{name}/stop", "post", 500)];
    // Every documented (path, method, status) was produced by the server.
    c.assert_every_response_seen(&unreachable);
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
    step: usize,
}

impl Fuzz {
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
        let mut spec = serde_json::json!({
            "name": name,
            "cmdline": "probe.tests=hang",
            "memory": self.rng.pick(&["16M", "32M", "64M"]).to_string(),
        });
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
            "host",
            "patch",
            "patch",
            "delete",
            "start",
            "start",
            "stop",
            "stop",
            "pause",
            "resume",
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
            "host" | "list" | "all-stats" | "metrics" => {
                let (tpl, path) = match op {
                    "host" => ("/v1/host", "/v1/host"),
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
                let path = tpl.replace("{name}", &name);
                let a = self.send(m, &tpl, &format!("{path}{query}"), None);
                assert_eq!(a.status, 405, "{at}: {m} {path}");
            }
            "unknown-path" => {
                let p = *self
                    .rng
                    .pick(&["/v1/nope", "/v2/host", "/v1/vms/a/b/c", "/", "/v1"]);
                let a = self.send("GET", "/undocumented", &format!("{p}{query}"), None);
                assert_eq!(a.status, 404, "{at}: GET {p}");
            }
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
        c: Checker::new(doc.clone(), daemon.socket.clone()),
        rng: Rng(seed),
        vms: BTreeMap::new(),
        scheduler: false,
        name_atoms,
        max_live: 1,
        ok: BTreeMap::new(),
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
    daemon.stop();
    assert!(f.step >= 100, "seed {seed}: only {} steps ran", f.step);
    // Every documented operation was driven to success at least once.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                assert!(
                    f.ok.contains_key(&(path.clone(), method.clone())),
                    "seed {seed}: {method} {path} never succeeded"
                );
            }
        }
    }
}
