//! The VMM control socket's request handling past the HTTP parser
//! (`wv_vmm::control::check_request`: the routes, the methods each allows, the bodies of
//! `PUT /vm/snapshot` and `PUT /vm/migrate-send` with their content types), behind the shared
//! HTTP parser (`wv_http::read_request`) read through a 16-byte buffer, as the API thread does
//! before anything reaches the VM. No VM runs: a request becomes a command or a 4xx answer,
//! never a panic; a command comes only from a path whose first segment is `vm` with the method its route allows.
//! The names of files passed with a request (`?file=NAME`, `wv_http::passing::file_keys`) are
//! read too: each name non-empty and %-decoded, or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{BufReader, Cursor};

fuzz_target!(|data: &[u8]| {
    let mut r = BufReader::with_capacity(16, Cursor::new(data));
    let Ok(req) = wv_http::read_request(&mut r) else {
        return;
    };
    if let Ok(keys) = wv_http::passing::file_keys(&req.query) {
        for k in keys {
            assert!(!k.is_empty() && k.len() <= 4096, "{k:?}");
        }
    }
    match wv_vmm::control::check_request(&req) {
        Ok(cmd) => {
            let want = match cmd {
                "info" | "counters" => "GET",
                _ => "PUT",
            };
            assert_eq!(req.method, want, "{cmd} from {} {}", req.method, req.path);
            let segs = wv_http::segments(&req.path).expect("a routed path decodes");
            assert_eq!(
                segs.first().map(String::as_str),
                Some("vm"),
                "{cmd} from {}",
                req.path
            );
            if !matches!(cmd, "snapshot" | "migrate-send") {
                assert!(req.body.is_empty(), "{cmd} with a body");
            }
        }
        Err((status, msg)) => {
            assert!((400..500).contains(&status), "{status} {msg}");
            assert!(!msg.is_empty());
        }
    }
});
