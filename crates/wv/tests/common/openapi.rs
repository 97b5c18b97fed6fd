//! Checking a live server against its OpenAPI document (docs/openapi.json for the daemon,
//! docs/vmm-openapi.json for a VMM's control socket): a validator for the subset of JSON Schema
//! the documents use, and a [`Checker`] that sends requests over a Unix socket, checks every
//! answer's status, headers and body against the document, and records which documented
//! (path, method, status) the server produced, so that a test can fail on one it never reached.

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// `docs/NAME`, parsed.
pub fn document(name: &str) -> Value {
    let path = format!("{}/../../docs/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `v`, or what its `$ref` points to (followed until a schema without one).
pub fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
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

/// One element of a `pattern`: a set of characters and how many times it repeats.
#[derive(Debug)]
pub struct Atom {
    pub set: Vec<char>,
    pub min: usize,
    pub max: usize,
}

/// The subset of regular expressions the document's patterns use: `^`, then literal
/// characters or `[...]` classes (ranges `a-z`, a trailing `-`), each with an optional
/// `{m,n}`, `{m}`, `?`, `*` or `+`, then `$`.
pub fn pattern(p: &str) -> Vec<Atom> {
    let body = p
        .strip_prefix('^')
        .and_then(|p| p.strip_suffix('$'))
        .unwrap_or_else(|| panic!("pattern {p} must be anchored"));
    let c: Vec<char> = body.chars().collect();
    let mut atoms = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let mut set = Vec::new();
        if c[i] == '[' {
            i += 1;
            while c[i] != ']' {
                if c.get(i + 1) == Some(&'-') && c.get(i + 2).is_some_and(|&x| x != ']') {
                    set.extend(c[i]..=c[i + 2]);
                    i += 3;
                } else {
                    set.push(c[i]);
                    i += 1;
                }
            }
        } else {
            assert!(
                !"().|\\".contains(c[i]),
                "pattern {p}: unsupported {}",
                c[i]
            );
            set.push(c[i]);
        }
        i += 1;
        let (mut min, mut max) = (1, 1);
        match c.get(i) {
            Some('?') => (min, max, i) = (0, 1, i + 1),
            Some('*') => (min, max, i) = (0, usize::MAX, i + 1),
            Some('+') => (min, max, i) = (1, usize::MAX, i + 1),
            Some('{') => {
                let end = i + c[i..].iter().position(|&x| x == '}').unwrap();
                let q: String = c[i + 1..end].iter().collect();
                let (a, b) = q.split_once(',').unwrap_or((&q, &q));
                (min, max) = (a.parse().unwrap(), b.parse().unwrap_or(usize::MAX));
                i = end + 1;
            }
            _ => {}
        }
        atoms.push(Atom { set, min, max });
    }
    atoms
}

/// Whether all of `s` matches `atoms`.
pub fn matches(atoms: &[Atom], s: &[char]) -> bool {
    let Some((a, rest)) = atoms.split_first() else {
        return s.is_empty();
    };
    let n = s
        .iter()
        .take(a.max)
        .take_while(|c| a.set.contains(c))
        .count();
    (a.min..=n).rev().any(|k| matches(rest, &s[k..]))
}

/// Whether `v` is of the JSON Schema `type` named.
fn of_type(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        _ => false,
    }
}

/// Checks `v` against the subset of JSON Schema the documents use (`at` names it in a
/// failure). `additionalProperties` is `false` (no property beyond `properties`), a schema
/// (every other property's value matches it, as in a map), or absent (anything goes).
/// A `oneOf` has alternatives of different types: `v` must be of exactly one of them, and
/// match it.
pub fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) {
    let s = resolve(doc, schema);
    if v.is_null() && s["nullable"] == Value::Bool(true) {
        return;
    }
    if let Some(alts) = s.get("oneOf").and_then(Value::as_array) {
        let fits: Vec<&Value> = alts
            .iter()
            .filter(|a| of_type(resolve(doc, a)["type"].as_str().unwrap_or(""), v))
            .collect();
        assert_eq!(fits.len(), 1, "{at}: {v} is of none or several of {alts:?}");
        return validate(doc, fits[0], v, at);
    }
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
                    None if s["additionalProperties"].is_object() => {
                        validate(doc, &s["additionalProperties"], val, &format!("{at}.{k}"))
                    }
                    None => assert!(
                        s["additionalProperties"] != Value::Bool(false),
                        "{at}: undocumented property {k}"
                    ),
                }
            }
        }
        Some("array") => {
            let a = v.as_array().unwrap_or_else(|| panic!("{at}: not an array"));
            if let Some(m) = s["maxItems"].as_u64() {
                assert!(a.len() as u64 <= m, "{at}: {} items > {m}", a.len());
            }
            if let Some(m) = s["minItems"].as_u64() {
                assert!(a.len() as u64 >= m, "{at}: {} items < {m}", a.len());
            }
            for (i, item) in a.iter().enumerate() {
                validate(doc, &s["items"], item, &format!("{at}[{i}]"));
            }
        }
        Some("string") => {
            let t = v
                .as_str()
                .unwrap_or_else(|| panic!("{at}: {v} is not a string"));
            let n = t.chars().count() as u64;
            if let Some(m) = s["minLength"].as_u64() {
                assert!(n >= m, "{at}: {n} characters < {m}");
            }
            if let Some(m) = s["maxLength"].as_u64() {
                assert!(n <= m, "{at}: {n} characters > {m}");
            }
            if let Some(p) = s["pattern"].as_str() {
                let c: Vec<char> = t.chars().collect();
                assert!(matches(&pattern(p), &c), "{at}: {t:?} does not match {p}");
            }
        }
        Some("boolean") => assert!(v.is_boolean(), "{at}: {v} is not a boolean"),
        Some("integer") => {
            // An unsigned counter may not fit an i64: compare it as a u64 then (no document
            // has a maximum that large).
            if let Some(n) = v.as_u64().filter(|&n| i64::try_from(n).is_err()) {
                if let Some(m) = s["maximum"].as_u64() {
                    assert!(n <= m, "{at}: {n} > {m}");
                }
                return;
            }
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

/// The methods the document lists for `tpl`, upper case.
pub fn documented_methods(doc: &Value, tpl: &str) -> BTreeSet<String> {
    doc["paths"][tpl]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(m, _)| *m != "parameters")
        .map(|(m, _)| m.to_uppercase())
        .collect()
}

/// The longest a server may take to answer (a VMM's 408 takes its 5 s request deadline, a
/// daemon's stop up to 5 s more).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the server sent on `s` until it closed the connection. A server that answers
/// before it has read the whole request (503 when busy, 413, 431) and closes leaves the
/// unread rest behind, and Linux then ends the client's reading with ECONNRESET after the
/// answer: that is the end of the answer, not an error.
pub fn read_answer(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => break,
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    String::from_utf8(out).unwrap_or_else(|e| panic!("the answer is not UTF-8: {e}"))
}

/// One answer: status, body (JSON, or Null when empty or not JSON) and header lines.
pub struct Answer {
    pub status: u16,
    pub json: Value,
    pub headers: Vec<String>,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [String], name: &str) -> Option<&'a str> {
    headers.iter().find_map(|h| {
        let (n, v) = h.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Sends requests to a server and checks each answer against the document.
pub struct Checker {
    pub doc: Value,
    pub socket: PathBuf,
    /// Every documented (path template, method in lower case, status) answered so far.
    pub seen: BTreeSet<(String, String, u16)>,
    /// Header lines sent with every request that has a body (e.g. its `Content-Type`).
    pub body_headers: Vec<String>,
}

impl Checker {
    pub fn new(doc: Value, socket: PathBuf) -> Checker {
        Checker {
            doc,
            socket,
            seen: BTreeSet::new(),
            body_headers: Vec::new(),
        }
    }

    /// Sends `method path` (the template is `tpl`), checks the answer against the document.
    pub fn call(
        &mut self,
        method: &str,
        tpl: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let a = self.exchange(method, tpl, path, body.map(str::as_bytes));
        (a.status, a.json)
    }

    /// Like [`Checker::call`], with raw body bytes and the headers. A method the document
    /// does not list for `tpl` must be answered 405 with an `Allow` header naming exactly the
    /// documented ones; a `tpl` the document does not have, 404.
    pub fn exchange(&mut self, method: &str, tpl: &str, path: &str, body: Option<&[u8]>) -> Answer {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        let b = body.unwrap_or(b"");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n",
            b.len()
        );
        if body.is_some() {
            for h in &self.body_headers {
                head.push_str(h);
                head.push_str("\r\n");
            }
        }
        head.push_str("\r\n");
        let mut req = head.into_bytes();
        req.extend_from_slice(b);
        // A server may answer before reading the request (503 when it serves its most
        // connections) and close: the write then fails, the answer is still there to read.
        let sent = s.write_all(&req);
        let out = read_answer(&mut s);
        assert!(
            !out.is_empty(),
            "{method} {path}: no answer (sending the request: {sent:?})"
        );
        let (head, text) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<String> = head.lines().skip(1).map(str::to_string).collect();
        let ctype = header(&headers, "content-type").unwrap_or_default();
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
            return Answer {
                status,
                json,
                headers,
            };
        }
        let op = &self.doc["paths"][tpl][method.to_lowercase()];
        if !op.is_object() {
            assert_eq!(status, 405, "{method} {tpl} is not documented: {text}");
            let allow: BTreeSet<String> = header(&headers, "allow")
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
            return Answer {
                status,
                json,
                headers,
            };
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
                content.contains_key(ctype) && !text.is_empty(),
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
        Answer {
            status,
            json,
            headers,
        }
    }

    /// Fails unless the server produced every (path, method, status) the document lists,
    /// but for those in `unreachable` (which no test can provoke).
    pub fn assert_every_response_seen(&self, unreachable: &[(&str, &str, u16)]) {
        for (path, item) in self.doc["paths"].as_object().unwrap() {
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
                        self.seen.contains(&(path.clone(), method.clone(), s)),
                        "{method} {path} {status} documented but never seen"
                    );
                }
            }
        }
    }
}
