//! The cluster link between nodes with vCPUs and node 0 (`wv_vmm::split::read_msg` and
//! `decode`): the input is a stream of frames as a hostile peer would send them (length, type,
//! payload). Every frame must decode to a message that re-encodes to the same bytes, or be
//! refused with an error; a length beyond the limit is refused without reading it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wv_vmm::split::{decode, encode, read_msg, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    // The body alone, as the decoder sees it.
    if let Ok(m) = decode(data) {
        assert_eq!(encode(&m)[4..], *data, "re-encoding differs");
    }
    // A stream of frames.
    let mut r = data;
    while let Ok(Some(m)) = read_msg(&mut r) {
        let f = encode(&m);
        assert!(f.len() - 4 <= MAX_FRAME);
        assert_eq!(decode(&f[4..]).as_ref(), Ok(&m));
    }
});
