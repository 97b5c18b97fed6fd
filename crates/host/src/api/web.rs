//! The web console: a page per host (every world with its state and settings, actions and
//! live edits, live plots from [`crate::history`], a VM's serial console in xterm.js over a
//! WebSocket), served on `wv host --web ADDR:PORT` and on the Unix socket (for a local proxy).
//! The page's assets are vendored in `crates/host/assets` (with their licences) and compiled
//! in: the page needs no internet.
//!
//! On `--web` everything but the login page and the assets needs the daemon's token, as a
//! bearer header or as the cookie the login form sets (`HttpOnly`, `SameSite=Strict`); a wrong
//! or missing one gets 401 and nothing else. Every request's `Host` must name the address the
//! console listens on (no DNS rebinding), an `Origin`, when sent, must be the console's own
//! (no cross-site request), and a request that is not a GET must say `Content-Type:
//! application/json` (which a cross-site form cannot send without a CORS preflight the
//! console never grants).

use super::{error, same_secret, Answer, Daemon};
use crate::http::{self, Request, Timed};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// The cookie that carries the token after the login form.
pub const COOKIE: &str = "wv_token";

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The Unix socket: permission-based, no token.
    Unix,
    /// `--listen`: the REST API over TCP (bearer token, no web pages).
    Api,
    /// `--web`: the web console and the REST API for its page.
    Web,
}

/// The page and its assets: (path, content type, text).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../assets/console.html"),
    ),
    (
        "/assets/console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console.js"),
    ),
    (
        "/assets/xterm.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/xterm.js"),
    ),
    (
        "/assets/xterm.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/xterm.css"),
    ),
    (
        "/assets/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/uPlot.iife.min.js"),
    ),
    (
        "/assets/uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/uPlot.min.css"),
    ),
    (
        "/assets/xterm.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("../../assets/xterm.LICENSE"),
    ),
    (
        "/assets/uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("../../assets/uPlot.LICENSE"),
    ),
];

const LOGIN: &str = include_str!("../../assets/login.html");

/// Headers of every page: no framing, scripts and connections to the console only.
const PAGE_HEADERS: &[&str] = &[
    "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options: DENY",
    "X-Content-Type-Options: nosniff",
    "Cache-Control: no-store",
];

/// Whether the request is the web console's rather than the REST API's.
pub fn is_web(req: &Request) -> bool {
    req.path == "/"
        || req.path == "/login"
        || req.path.starts_with("/assets/")
        || console_of(req).is_some()
}

/// The VM whose console a WebSocket request asks for (`GET /v1/vms/{name}/console`).
fn console_of(req: &Request) -> Option<String> {
    if !req
        .upgrade
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return None;
    }
    let segs = http::segments(&req.path).ok()?;
    match segs.as_slice() {
        [v1, vms, name, console] if v1 == "v1" && vms == "vms" && console == "console" => {
            Some(name.clone())
        }
        _ => None,
    }
}

fn page(status: u16, ctype: &str, body: &str) -> Answer {
    let mut headers = vec![format!("Content-Type: {ctype}")];
    headers.extend(PAGE_HEADERS.iter().map(|h| (*h).to_string()));
    Answer {
        status,
        headers,
        body: body.to_string(),
        exit: false,
    }
}

fn login_page(status: u16, note: &str) -> Answer {
    page(
        status,
        "text/html; charset=utf-8",
        &LOGIN.replace("{{note}}", note),
    )
}

/// The token a request carries: a bearer header, or the login cookie.
fn token_of(req: &Request) -> Option<&str> {
    if let Some(t) = req
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
    {
        return Some(t.trim());
    }
    req.cookie.as_deref()?.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE).then_some(v.trim())
    })
}

/// The value of `key` in an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })?;
    let raw = raw.replace('+', " ");
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Daemon {
    /// Sets the addresses (`HOST:PORT`) the web console answers to: what it was told to listen
    /// on, the address it got, and `localhost:PORT` on loopback.
    pub(super) fn set_web_hosts(&self, given: &str, local: std::net::SocketAddr) {
        let mut hosts = vec![given.to_string(), local.to_string()];
        if local.ip().is_loopback() {
            hosts.push(format!("localhost:{}", local.port()));
        }
        let _ = self.web_hosts.set(hosts);
    }

    /// The `Host` of a request on `--web`, if it is one of the console's addresses.
    fn web_host<'a>(&self, req: &'a Request) -> Option<&'a str> {
        let host = req.host.as_deref()?;
        self.web_hosts
            .get()
            .is_some_and(|h| h.iter().any(|x| x == host))
            .then_some(host)
    }

    /// What a request on `--web` must satisfy before it is handled (see the module's doc):
    /// 403 for a foreign `Host` or `Origin`, 401 without the token (but the login page, its
    /// form and the assets, and `/`, which shows the login page to a client without it), 415
    /// for a request other than GET that is not JSON.
    pub(super) fn admit_web(&self, req: &Request) -> Option<Answer> {
        let Some(host) = self.web_host(req) else {
            return Some(
                error(
                    403,
                    format!(
                        "Host '{}' is not this console's address",
                        req.host.as_deref().unwrap_or("")
                    ),
                )
                .into(),
            );
        };
        if req
            .origin
            .as_deref()
            .is_some_and(|o| o != format!("http://{host}"))
        {
            return Some(error(403, "cross-site requests are refused").into());
        }
        if req.path == "/" || req.path == "/login" || req.path.starts_with("/assets/") {
            return None;
        }
        if !token_of(req).is_some_and(|t| same_secret(t.as_bytes(), self.token.as_bytes())) {
            return Some(
                error(
                    401,
                    "the web console needs the daemon's token: log in at / (wv host token shows it)",
                )
                .into(),
            );
        }
        let json = req.content_type.as_deref().is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim() == "application/json")
        });
        if req.method != "GET" && !json {
            return Some(
                error(
                    415,
                    "a request other than GET must be Content-Type: application/json",
                )
                .into(),
            );
        }
        None
    }

    /// Answers a web console request (after [`Daemon::admit_web`] on `--web`); `None` when a
    /// WebSocket took the connection over and has ended.
    pub(super) fn web<S: Timed>(&self, req: &Request, stream: &S, via: Via) -> Option<Answer> {
        let authed = via == Via::Unix
            || token_of(req).is_some_and(|t| same_secret(t.as_bytes(), self.token.as_bytes()));
        if let Some(name) = console_of(req) {
            if req.method != "GET" {
                return Some(error(405, "a console is a GET with Upgrade: websocket").into());
            }
            return self.console_ws(&name, req, stream).err();
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") if !authed => Some(login_page(401, "")),
            ("GET", "/login") => Some(login_page(200, "")),
            ("POST", "/login") => Some(self.login(req, via)),
            ("GET", path) => match ASSETS.iter().find(|(p, ..)| *p == path) {
                Some((_, ctype, text)) => Some(page(200, ctype, text)),
                None => Some(error(404, format!("no such resource: {path}")).into()),
            },
            (m, path) => Some(error(405, format!("{m} is not allowed on {path}")).into()),
        }
    }

    /// `POST /login` (the form, `token=...`): the cookie and the page, or the form again.
    fn login(&self, req: &Request, via: Via) -> Answer {
        let form = req.content_type.as_deref().is_some_and(|c| {
            c.split(';').next().map(str::trim) == Some("application/x-www-form-urlencoded")
        });
        if !form {
            return error(415, "the login form is application/x-www-form-urlencoded").into();
        }
        let token = form_value(&req.body, "token").unwrap_or_default();
        if !same_secret(token.trim().as_bytes(), self.token.as_bytes()) {
            return login_page(401, "That is not the daemon's token.");
        }
        let mut a = page(303, "text/plain; charset=utf-8", "logged in");
        a.headers.push("Location: /".into());
        if via == Via::Web {
            a.headers.push(format!(
                "Set-Cookie: {COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                self.token
            ));
        }
        a
    }

    /// `GET /v1/vms/{name}/console` with `Upgrade: websocket`: the VM's serial console (the
    /// stream `wv vm console` gets) both ways, binary frames, until either side ends.
    fn console_ws<S: Timed>(&self, name: &str, req: &Request, stream: &S) -> Result<(), Answer> {
        let key = req
            .websocket_key
            .as_deref()
            .ok_or_else(|| Answer::from(error(400, "a WebSocket needs Sec-WebSocket-Key")))?;
        let sock = {
            let doc = self.lock();
            let w = doc
                .worlds
                .iter()
                .find(|w| w.spec.name == name)
                .ok_or_else(|| Answer::from(error(404, format!("no VM named '{name}'"))))?;
            w.console
                .clone()
                .ok_or_else(|| Answer::from(error(409, format!("VM '{name}' is not running"))))?
        };
        let console = std::os::unix::net::UnixStream::connect(&sock)
            .map_err(|e| Answer::from(error(409, format!("VM '{name}': its console: {e}"))))?;
        let (mut rd, wr) = stream
            .split()
            .map_err(|e| Answer::from(error(500, format!("the connection: {e}"))))?;
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(Some(super::REQUEST_TIMEOUT));
        let wr = Arc::new(Mutex::new(wr));
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(key)
        );
        if send(&wr, head.as_bytes()).is_err() {
            return Ok(());
        }
        // The console's output, to the browser.
        let (out, mut from_vm) = (
            wr.clone(),
            console
                .try_clone()
                .map_err(|e| Answer::from(error(500, format!("the console: {e}"))))?,
        );
        let pump = std::thread::Builder::new()
            .name("console-ws".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match from_vm.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if send(&out, &frame(2, &buf[..n])).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = send(&out, &frame(8, &[]));
            });
        // The browser's input, to the console.
        let mut to_vm = console;
        while let Ok(Some((op, data))) = read_frame(&mut rd) {
            let sent = match op {
                0..=2 => to_vm.write_all(&data),
                8 => break,
                9 => send(&wr, &frame(10, &data)),
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = to_vm.shutdown(std::net::Shutdown::Both);
        if let Ok(p) = pump {
            let _ = p.join();
        }
        Ok(())
    }
}

fn send(w: &Mutex<Box<dyn Write + Send>>, bytes: &[u8]) -> std::io::Result<()> {
    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(bytes)?;
    w.flush()
}

/// Largest WebSocket frame the console takes from a browser.
const MAX_FRAME: u64 = 1 << 16;

/// One frame from the browser, unmasked: (opcode, payload); `None` at the end of the stream.
/// A frame that is not masked (every client frame is) or too large is an error.
fn read_frame(r: &mut dyn Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut h = [0u8; 2];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let op = h[0] & 0x0f;
    if h[1] & 0x80 == 0 {
        return Err(std::io::Error::other("an unmasked frame from a client"));
    }
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > MAX_FRAME {
        return Err(std::io::Error::other("a frame over 64 KiB"));
    }
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask)?;
    let mut data = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    r.read_exact(&mut data)?;
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Some((op, data)))
}

/// A final, unmasked frame (the server's).
fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | op];
    match data.len() {
        n @ 0..=125 => f.push(u8::try_from(n).unwrap_or(0)),
        n @ 126..=0xffff => {
            f.push(126);
            f.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(data);
    f
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455: base64 of the SHA-1 of key and GUID).
fn accept_key(key: &str) -> String {
    let mut m = key.trim().as_bytes().to_vec();
    m.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64(&sha1(&m))
}

/// SHA-1 (FIPS 180-4), for the WebSocket handshake only.
fn sha1(msg: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut m = msg.to_vec();
    let bits = (msg.len() as u64).wrapping_mul(8);
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend_from_slice(&bits.to_be_bytes());
    for block in m.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_of_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        // A masked client frame of 200 bytes.
        let data: Vec<u8> = (0..200u8).collect();
        let mask = [1, 2, 3, 4];
        let mut f = vec![0x82, 0x80 | 126, 0, 200];
        f.extend_from_slice(&mask);
        f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        let (op, got) = read_frame(&mut &f[..]).unwrap().unwrap();
        assert_eq!((op, got), (2, data.clone()));
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        // Unmasked, or too large: refused, never allocated.
        assert!(read_frame(&mut &frame(2, b"x")[..]).is_err());
        let huge = [0x82, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert!(read_frame(&mut &huge[..]).is_err());
        assert_eq!(frame(2, &data)[..4], [0x82, 126, 0, 200]);
    }

    #[test]
    fn tokens_come_from_a_header_or_the_cookie() {
        let mut r = http::read_request(&mut std::io::BufReader::new(
            &b"GET / HTTP/1.1\r\nCookie: a=b; wv_token=abc ; c=d\r\n\r\n"[..],
        ))
        .unwrap();
        assert_eq!(token_of(&r), Some("abc"));
        r.authorization = Some("Bearer xyz".into());
        assert_eq!(token_of(&r), Some("xyz"));
        assert_eq!(
            form_value(b"x=1&token=a%2Bb+c", "token").as_deref(),
            Some("a+b c")
        );
        assert_eq!(form_value(b"token=%zz", "token"), None);
        assert_eq!(form_value(b"token=%4", "token"), None);
    }
}
