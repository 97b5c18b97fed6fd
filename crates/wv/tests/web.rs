//! The web console in a real browser: Debian's chromium, headless, driven through
//! chromium-driver over the WebDriver protocol (a few JSON requests, made here with std alone):
//! refused without the token, logged in with it, a running probe guest's world in the table,
//! its CPU plot gaining points, its serial console typed into and echoed (the probe's `echo`
//! test), paused and resumed from the page; a second guest doing disk and network I/O (the
//! probe's `persist` disk writer, then `netbench`), whose exits-by-cause, disk and net plots
//! gain points and show the writes and frames sent. A screenshot of the page (that guest's
//! plots) is saved as `web-console.png` in the test's target directory
//! (`CARGO_TARGET_TMPDIR`).

mod common;
use common::daemon::Daemon;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP exchange with chromedriver: the JSON answer's `value`.
fn wd(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let b = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    // Headers, then a body of Content-Length bytes.
    let mut r = std::io::BufReader::new(s);
    let mut len = 0usize;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
        head.push_str(&line);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    let out = String::from_utf8(body).unwrap();
    let text = out.as_str();
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {head}{out}"));
    v["value"].clone()
}

/// chromedriver, killed when dropped (also when the browser's start panics half-way: an
/// orphaned driver would keep every inherited descriptor open).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Browser {
    _driver: Driver,
    port: u16,
    session: String,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Driver(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver (Debian package chromium-driver) is needed"),
        );
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1300"]
            }
        }}});
        let v = wd(port, "POST", "/session", Some(&caps));
        let session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            _driver: driver,
            port,
            session,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    fn fetch_status(&self, path: &str) -> u64 {
        let v = self.call(
            "POST",
            "/execute/async",
            Some(json!({
                "script": "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => done(r.status), e => done(String(e)));",
                "args": [path]
            })),
        );
        v.as_u64().unwrap_or_else(|| panic!("fetch {path}: {v}"))
    }

    fn find(&self, css: &str) -> String {
        let t = Instant::now();
        loop {
            let v = self.call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            );
            if let Some(id) = v
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
            {
                return id.to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no {css}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element `css` from inside the page, found and clicked in one script: the
    /// table is drawn again each second, and a WebDriver click on an element found a moment
    /// before may land on one just replaced (seen: a pause or a plot button click lost).
    fn click(&self, css: &str) {
        let js = format!(
            "const e = document.querySelector({}); if (!e) return false; e.click(); return true",
            Value::from(css)
        );
        self.until(&js, &format!("no {css} to click"));
    }

    fn keys(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Waits (up to 30 s) until `js` returns true.
    fn until(&self, js: &str, what: &str) {
        self.until_within(js, what, Duration::from_secs(30));
    }

    /// Waits (up to 120 s: a guest's workload ahead of it may be slow where guest kernel code
    /// is emulated) until `js` returns true.
    fn until_long(&self, js: &str, what: &str) {
        self.until_within(js, what, Duration::from_secs(120));
    }

    fn until_within(&self, js: &str, what: &str, limit: Duration) {
        let t = Instant::now();
        loop {
            let v = self.script(js);
            if v == Value::Bool(true) {
                return;
            }
            assert!(t.elapsed() < limit, "{what}: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = wd(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        // The driver itself goes with `self._driver`.
    }
}

fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let b: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::new();
    for c in b.chunks(4) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, x)| a | (u32::from(val(*x)) << (18 - 6 * i)));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..c.len()]);
    }
    out
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_web_console_in_a_browser() {
    need_kvm();
    let dir = TempDir::new("web");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&dir, &["--web", &addr]);
    let r = d.wv(&[
        "vm",
        "create",
        "probe",
        "--memory",
        "32M",
        "--cmdline",
        "console=ttyS0 probe.tests=echo",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    d.json(&["vm", "start", "probe"]);
    // The I/O guest: a raw disk its VMM serves, a net on the daemon's switch; it writes the
    // disk every 5 ms for 8 s, then sends 20000 frames, then waits.
    let disk = dir.file("io.img", &vec![0u8; 8 << 20]);
    assert_eq!(d.wv(&["net", "create", "lan"]).status, Some(0));
    let r = d.wv(&[
        "vm",
        "create",
        "io",
        "--memory",
        "64M",
        "--disk",
        &format!("path={},id=data", disk.display()),
        "--net",
        "network=lan",
        "--cmdline",
        "console=ttyS0 probe.tests=persist,netbench,hang probe.persist_mib=1 probe.persist_ms=8000 \
         probe.persist_disk=1 probe.persist_disk_ms=5 probe.frames=20000",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    d.json(&["vm", "start", "io"]);
    let token = std::fs::read_to_string(d.state.join("api-token")).unwrap();
    let base = format!("http://{addr}");

    let b = Browser::start();
    // Without the token: the login page, and the API refuses.
    b.go(&format!("{base}/"));
    b.until(
        "return document.title === 'Worldvisor: log in'",
        "login page",
    );
    assert_eq!(b.fetch_status("/v1/vms"), 401);
    b.keys("#token", "not-the-token");
    b.click("#login");
    b.until(
        "return document.body.innerText.includes('not the daemon')",
        "a wrong token refused",
    );
    assert_eq!(b.fetch_status("/v1/vms"), 401);

    // With it.
    b.keys("#token", token.trim());
    b.click("#login");
    b.until("return document.title === 'Worldvisor'", "the console page");
    assert_eq!(b.fetch_status("/v1/vms"), 200);
    let row = "tr[data-name=\"probe\"]";
    b.until(
        &format!("const s = document.querySelector('{row} .state'); return !!s && s.textContent === 'running'"),
        "the probe VM running in the table",
    );
    b.until(
        "return !!document.querySelector('tr[data-name=\"management\"]')",
        "the system worlds in the table",
    );

    // Its plots, gaining a point a second.
    b.click(&format!("{row} button.plot"));
    b.until(
        "return !!window.wvPlot && window.wvPlot.data[0].length >= 2",
        "the CPU plot has points",
    );
    let n = b
        .script("return window.wvPlot.data[0].length")
        .as_u64()
        .unwrap();
    b.until(
        &format!("return window.wvPlot.data[0].length > {n}"),
        "the CPU plot gains points",
    );

    // Its console: typed into, echoed by the guest.
    b.click(&format!("{row} button.console"));
    b.until(
        "return !!window.wvConsole && window.wvConsole.ws.readyState === 1",
        "the console's WebSocket open",
    );
    b.until(
        "return window.wvConsole.text().includes(\"echo: type, 'q' ends\")",
        "the guest's prompt on the console",
    );
    b.keys(".xterm-helper-textarea", "hello web");
    b.until(
        "return window.wvConsole.text().includes('hello web')",
        "the guest echoed what was typed",
    );

    // Pause and resume from the page; the daemon agrees.
    b.click(&format!("{row} button.pause"));
    b.until(
        &format!("return document.querySelector('{row} .state').textContent === 'paused' \
                  || document.querySelector('{row} .state').textContent + ': ' + document.querySelector('#error').textContent"),
        "paused",
    );
    assert_eq!(d.json(&["vm", "info", "probe"])["state"], "paused");
    b.click(&format!("{row} button.resume"));
    b.until(
        &format!("return document.querySelector('{row} .state').textContent === 'running'"),
        "resumed",
    );
    assert_eq!(d.json(&["vm", "info", "probe"])["state"], "running");

    // The I/O guest's plots: exits by cause, and its disk's and net's bytes and operations.
    b.click("tr[data-name=\"io\"] button.plot");
    b.until(
        "const p = window.wvPlots; \
         if (!!p && document.querySelector('#plotname').textContent === 'io' \
             && p.exits.series.length > 2 && p.exits.data[0].length >= 2) return true; \
         return p ? JSON.stringify({exits: p.exits.series.map(s => s.label), points: p.exits.data[0].length, \
             disks: p.disks.series.map(s => s.label), nets: p.nets.series.map(s => s.label)}) : null",
        "the exits plot has points and causes (series beyond the time axis and 'all')",
    );
    let n = b
        .script("return window.wvPlots.exits.data[0].length")
        .as_u64()
        .unwrap();
    b.until(
        &format!("return window.wvPlots.exits.data[0].length > {n}"),
        "the exits-by-cause plot gains points",
    );
    // A series named `label` of `chart` has a point above 0.
    let moved = |chart: &str, label: &str| {
        format!(
            "const p = window.wvPlots.{chart}; const i = p.series.findIndex(s => s.label === '{label}'); \
             return i > 0 && p.data[i].some(v => v > 0)"
        )
    };
    b.until_long(
        &moved("disks", "data write B/s"),
        "the disk plot shows the writes",
    );
    b.until_long(
        &moved("disks", "data write ops/s"),
        "the disk plot shows write operations",
    );
    let n = b
        .script("return window.wvPlots.disks.data[0].length")
        .as_u64()
        .unwrap();
    b.until(
        &format!("return window.wvPlots.disks.data[0].length > {n}"),
        "the disk plot gains points",
    );
    b.until_long(
        &moved("nets", "lan tx B/s"),
        "the net plot shows the frames sent",
    );
    b.until_long(
        &moved("nets", "lan tx frames/s"),
        "the net plot shows frames per second",
    );
    // What the page plotted, from the API: as documented, the disk served by the VMM and the
    // net served by the switch, and the causes KVM counted.
    let (st, body) = d.raw(b"GET /v1/history HTTP/1.1\r\nHost: wv\r\n\r\n");
    assert_eq!(st, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    let doc = common::openapi::document("openapi.json");
    common::openapi::validate(
        &doc,
        &json!({"$ref": "#/components/schemas/History"}),
        &h,
        "GET /v1/history",
    );
    let io = h["worlds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "io")
        .unwrap_or_else(|| panic!("no io world: {h}"));
    let kinds: Vec<(&str, &str)> = io["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("data", "disk"), ("lan", "net")], "{io}");
    let causes = io["exit_causes"].as_object().unwrap();
    assert!(!causes.is_empty(), "{io}");
    // The VMM's finer causes beside KVM's: the guest's disk notifications reach the VMM as
    // MMIO writes to its virtio-blk device.
    assert!(
        causes.keys().any(|k| k.starts_with("vmm:mmio:virtio-blk")),
        "no vmm:mmio:virtio-blk* series among {:?}",
        causes.keys().collect::<Vec<_>>()
    );

    let png = b.call("GET", "/screenshot", None);
    let png = unbase64(png.as_str().expect("a screenshot"));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-console.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("web console screenshot: {}", out.display());
    // The daemon's resident memory with one browser attached (its page polling every second
    // for the whole test), for docs/PERFORMANCE.md.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let rss = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    eprintln!(
        "daemon with one browser attached: VmRSS {}, VmHWM {}",
        rss("VmRSS:"),
        rss("VmHWM:")
    );
    drop(b);
    d.json(&["vm", "stop", "probe"]);
    d.json(&["vm", "stop", "io"]);
    d.stop();
}
