//! The daemon's HTTP/1.1 request parser (`wv_host::http::read_request`) and path decoder
//! (`segments`), fed the raw bytes a client (local, or over TCP with --listen) could send:
//! either a request or a clear 4xx/5xx error, never a panic, a hang or an oversized body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{BufReader, Cursor};
use wv_host::http::{read_request, segments};

fuzz_target!(|data: &[u8]| {
    // A small buffer, so that lines and bodies straddle reads as they do on a socket.
    let mut r = BufReader::with_capacity(16, Cursor::new(data));
    match read_request(&mut r) {
        Ok(req) => {
            assert!(req.path.starts_with('/'), "{:?}", req.path);
            assert!(req.body.len() <= data.len(), "a body larger than the input");
            if let Ok(segs) = segments(&req.path) {
                for s in segs {
                    assert!(!s.contains('\0'), "a NUL reached a path segment");
                }
            }
        }
        Err(e) => assert!((400..600).contains(&e.0), "status {}", e.0),
    }
    // The decoder on its own, on any text.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = segments(text);
    }
});
