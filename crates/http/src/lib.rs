//! Just enough HTTP/1.1 for the daemon's API and each VMM's control socket, over a Unix socket (or TCP when asked), with hard limits: a request line and
//! headers of at most 8 KiB each and 100 headers, a body of at most 1 MiB given by
//! Content-Length (no chunked encoding), one request per connection, the whole request read
//! within a deadline ([`Deadline`]). Anything else is a 4xx answer, never a panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
const MAX_LINE: usize = 8192;
const MAX_HEADERS: usize = 100;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path as sent, without the query string (segments still %-encoded: see [`segments`]).
    pub path: String,
    /// The query string (after `?`), empty when none; the API uses none of its parameters.
    pub query: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The `Authorization` header, if sent.
    pub authorization: Option<String>,
    /// The `Origin` header, if sent (browsers send it with cross-site requests).
    pub origin: Option<String>,
    /// The `Content-Type` header, if sent.
    pub content_type: Option<String>,
    /// The `Host` header, if sent.
    pub host: Option<String>,
    /// The `Cookie` header, if sent.
    pub cookie: Option<String>,
    /// The `Upgrade` header, if sent (`websocket`).
    pub upgrade: Option<String>,
    /// The `Sec-WebSocket-Key` header, if sent.
    pub websocket_key: Option<String>,
}

pub mod passing;

/// The path's segments, %-decoded one by one (so `%2F` is a `/` inside a segment, never a
/// separator). A trailing `/` is ignored. An invalid escape, a NUL or a segment that is not
/// UTF-8 is a 400.
pub fn segments(path: &str) -> Result<Vec<String>, HttpError> {
    path.trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect()
}

fn percent_decode(s: &str) -> Result<String, HttpError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| HttpError(400, format!("bad %-escape in '{s}'")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err(HttpError(
            400,
            format!("NUL byte in the path segment '{s}'"),
        ));
    }
    String::from_utf8(out).map_err(|_| HttpError(400, format!("path segment '{s}' is not UTF-8")))
}

/// A stream whose timeouts can be set (Unix and TCP sockets).
pub trait Timed {
    /// Sets the timeout of the next reads.
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Sets the timeout of the next writes.
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Whether the peer may be on another host (TCP): its requests need the API token.
    fn remote(&self) -> bool {
        false
    }
    /// The stream's two directions, each usable on its own thread (a WebSocket's).
    fn split(&self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)>;
}

impl Timed for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn split(&self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        Ok((Box::new(self.try_clone()?), Box::new(self.try_clone()?)))
    }
}

impl Timed for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
    fn remote(&self) -> bool {
        true
    }
    fn split(&self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        Ok((Box::new(self.try_clone()?), Box::new(self.try_clone()?)))
    }
}

/// Reads from a stream until a deadline for the whole request, not per read: each read may
/// wait only for the time left, so a client trickling one byte at a time cannot hold a
/// connection longer than the deadline. Past it, reads fail with `TimedOut` (answered 408).
pub struct Deadline<S> {
    inner: S,
    end: Instant,
}

impl<S: Read + Timed> Deadline<S> {
    /// `inner`, readable until `limit` from now.
    pub fn new(inner: S, limit: Duration) -> Self {
        Deadline {
            inner,
            end: Instant::now() + limit,
        }
    }

    /// The stream, to answer on.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Read + Timed> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.inner.set_read_timeout(Some(left))?;
        match self.inner.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::ErrorKind::TimedOut.into())
            }
            r => r,
        }
    }
}

fn read_error(e: &std::io::Error, what: &str) -> HttpError {
    if e.kind() == std::io::ErrorKind::TimedOut {
        HttpError(408, "the request was not received in time".into())
    } else {
        HttpError(400, format!("{what}: {e}"))
    }
}

/// Why a request could not be read: the status to answer and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpError(pub u16, pub String);

fn read_line(r: &mut impl BufRead) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| read_error(&e, "reading the request"))?;
    if n == 0 {
        return Err(HttpError(400, "empty request".into()));
    }
    if n > MAX_LINE || !line.ends_with(b"\n") {
        return Err(HttpError(431, "request line or header too long".into()));
    }
    while line.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError(400, "request is not UTF-8".into()))
}

/// Reads one request.
pub fn read_request(r: &mut impl BufRead) -> Result<Request, HttpError> {
    let line = read_line(r)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError(400, format!("malformed request line '{line}'")));
    };
    if !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return Err(HttpError(400, format!("malformed request line '{line}'")));
    }
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut length = 0usize;
    let (mut authorization, mut origin, mut content_type) = (None, None, None);
    let (mut host, mut cookie, mut upgrade, mut websocket_key) = (None, None, None, None);
    for i in 0.. {
        let h = read_line(r)?;
        if h.is_empty() {
            break;
        }
        if i == MAX_HEADERS {
            return Err(HttpError(431, "too many headers".into()));
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(HttpError(400, format!("malformed header '{h}'")));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| HttpError(400, format!("bad Content-Length '{value}'")))?;
                if length > MAX_BODY {
                    return Err(HttpError(
                        413,
                        format!("body of {length} bytes is over the {MAX_BODY}-byte limit"),
                    ));
                }
            }
            "authorization" => authorization = Some(value.to_string()),
            "origin" => origin = Some(value.to_string()),
            "content-type" => content_type = Some(value.to_string()),
            "host" => host = Some(value.to_string()),
            "cookie" => cookie = Some(value.to_string()),
            "upgrade" => upgrade = Some(value.to_string()),
            "sec-websocket-key" => websocket_key = Some(value.to_string()),
            "transfer-encoding" => {
                return Err(HttpError(
                    411,
                    "chunked bodies are not accepted; send Content-Length".into(),
                ))
            }
            _ => {}
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)
        .map_err(|e| read_error(&e, "body shorter than Content-Length"))?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body,
        authorization,
        origin,
        content_type,
        host,
        cookie,
        upgrade,
        websocket_key,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        303 => "See Other",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a response (with `headers`, each `Name: value`; JSON unless they give a
/// `Content-Type`) and ends the exchange.
pub fn write_response(
    w: &mut impl Write,
    status: u16,
    headers: &[String],
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    let typed = headers.iter().any(|h| {
        h.get(..13)
            .is_some_and(|n| n.eq_ignore_ascii_case("content-type:"))
    });
    if !body.is_empty() && !typed {
        head.push_str("Content-Type: application/json\r\n");
    }
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    write!(
        w,
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// A connection to the daemon.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// Client side: sends one request to the daemon at `socket` (a Unix socket path, or
/// `tcp:HOST:PORT`) and returns (status, body). Over TCP it sends the token in `WV_TOKEN`
/// (`wv host token` shows a daemon's).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let token = std::env::var("WV_TOKEN").ok();
    request_with(socket, method, path, body, token.as_deref(), None)
}

/// [`request`] with the token given (sent over TCP only) instead of read from `WV_TOKEN`,
/// and, with `timeout`, a bound on connecting and on each read and write (a peer that
/// stops answering is a `TimedOut` or `WouldBlock` error instead of a wait for ever).
pub fn request_with(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
    timeout: Option<Duration>,
) -> std::io::Result<(u16, String)> {
    // A token is one header value: nothing that could end the line or start another.
    if token.is_some_and(|t| !t.trim().bytes().all(|b| b.is_ascii_graphic())) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the token holds characters other than printable ASCII",
        ));
    }
    let tcp = socket.to_str().and_then(|s| s.strip_prefix("tcp:"));
    let mut s: Box<dyn Conn> = match tcp {
        Some(addr) => {
            let s = match timeout {
                None => std::net::TcpStream::connect(addr)?,
                Some(t) => {
                    let a = std::net::ToSocketAddrs::to_socket_addrs(addr)?
                        .next()
                        .ok_or_else(|| {
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidInput,
                                format!("'{addr}' names no address"),
                            )
                        })?;
                    std::net::TcpStream::connect_timeout(&a, t)?
                }
            };
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            Box::new(s)
        }
        None => {
            let s = UnixStream::connect(socket)?;
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            Box::new(s)
        }
    };
    let auth = match (tcp, token) {
        (Some(_), Some(t)) => format!("Authorization: Bearer {}\r\n", t.trim()),
        _ => String::new(),
    };
    s.write_all(&request_bytes(method, path, body, &auth))?;
    read_answer(BufReader::new(s))
}

/// A request's bytes: JSON body (or none) and the extra headers `auth`.
fn request_bytes(method: &str, path: &str, body: Option<&str>, auth: &str) -> Vec<u8> {
    let b = body.unwrap_or("");
    format!("{method} {path} HTTP/1.1\r\nHost: wv\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()).into_bytes()
}

/// [`request_with`] on the Unix socket `socket`, passing `files` (each with the name it is
/// to be known by) with the request ([`passing`]: the names go in the query string).
pub fn request_passing(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    files: &[(&str, std::os::fd::BorrowedFd<'_>)],
    timeout: Option<Duration>,
) -> std::io::Result<(u16, String)> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    let query: Vec<String> = files
        .iter()
        .map(|(k, _)| format!("file={}", passing::encode_key(k)))
        .collect();
    let sep = if path.contains('?') { '&' } else { '?' };
    let path = format!("{path}{sep}{}", query.join("&"));
    let fds: Vec<_> = files.iter().map(|(_, f)| *f).collect();
    passing::send_with_files(&s, &request_bytes(method, &path, body, ""), &fds)?;
    read_answer(BufReader::new(s))
}

/// The status and body of an answer.
fn read_answer(mut r: impl BufRead) -> std::io::Result<(u16, String)> {
    let status_line = read_line(&mut r).map_err(|e| std::io::Error::other(e.1))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line '{status_line}'")))?;
    let mut length = 0usize;
    loop {
        let h = read_line(&mut r).map_err(|e| std::io::Error::other(e.1))?;
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length.min(64 << 20)];
    r.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut BufReader::new(s))
    }

    #[test]
    fn requests_and_limits() {
        let r = parse(b"POST /v1/vms HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/v1/vms", &b"{}"[..])
        );
        assert_eq!(parse(b"GET /x HTTP/1.1\r\n\r\n").unwrap().body, b"");
        assert_eq!(parse(b"").unwrap_err().0, 400);
        assert_eq!(parse(b"GET\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(parse(b"GET x HTTP/1.1\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(parse(b"GET /x SPDY/3\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
                .unwrap_err()
                .0,
            413
        );
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err()
                .0,
            411
        );
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nnocolon\r\n\r\n").unwrap_err().0,
            400
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(10_000));
        assert_eq!(parse(long.as_bytes()).unwrap_err().0, 431);
        let many: String = (0..150).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            parse(format!("GET /x HTTP/1.1\r\n{many}\r\n").as_bytes())
                .unwrap_err()
                .0,
            431
        );
        assert_eq!(
            parse(b"GET /x HTTP/1.1\r\nX: \xff\r\n\r\n").unwrap_err().0,
            400
        );
        let q = parse(b"GET /v1/host?verbose=1 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (q.path.as_str(), q.query.as_str()),
            ("/v1/host", "verbose=1")
        );
    }

    #[test]
    fn segments_are_decoded_one_by_one() {
        assert_eq!(segments("/v1/vms/a%2Fb/").unwrap(), ["v1", "vms", "a/b"]);
        assert_eq!(segments("/v1/vms/a%2eb").unwrap(), ["v1", "vms", "a.b"]);
        assert_eq!(segments("/v1/vms/%2E%2E").unwrap(), ["v1", "vms", ".."]);
        for bad in ["/a%", "/a%2", "/a%zz", "/a%00", "/a%ff"] {
            assert_eq!(segments(bad).unwrap_err().0, 400, "{bad}");
        }
    }

    #[test]
    fn the_deadline_covers_the_whole_request() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            // Each byte well within any per-read timeout, the whole far beyond the deadline.
            for c in b"GET /x HTTP/1.1\r\n\r\n" {
                if a.write_all(&[*c]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        let t = Instant::now();
        let mut r = BufReader::new(Deadline::new(b, Duration::from_millis(200)));
        assert_eq!(read_request(&mut r).unwrap_err().0, 408);
        let took = t.elapsed();
        assert!(took < Duration::from_millis(600), "{took:?}");
        drop(r);
        writer.join().unwrap();
    }
}
