//! The net paths: transmit chains (header and frame validation) and delivery of a frame the
//! fuzzer chooses into receive buffers, with and without mergeable buffers; the input's
//! mutations are applied between the reading of the chains and their serving.
#![no_main]
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;
use wv_virtio::chain::{Chain, MAX_CHAIN};
use wv_virtio::net::{deliver_frame_with, transmit_chain, NetCounters, MAX_FRAME};
use wv_virtio::ActiveQueue;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::memory(data);
    // Transmit: every chain either goes out whole, exactly as long as it was when read, or
    // is refused.
    let mut q = common::queue();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..32 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let Ok(c) = Chain::read(&mem, chain, MAX_CHAIN) else {
            continue;
        };
        common::mutate(&mem, data);
        let before = out.len();
        if transmit_chain(&mem, &c, &mut out, &mut buf) {
            assert!(out.len() - before <= MAX_FRAME);
            assert_eq!(out.len() - before, c.readable_bytes() as usize);
        } else {
            assert_eq!(out.len(), before);
        }
    }
    // Receive: the frame is the input from FRAME_AT on (it also lies in guest memory there).
    let frame = data.get(common::FRAME_AT..).unwrap_or(&[]);
    let mut aq = ActiveQueue {
        queue: common::queue(),
        evt: EventFd::new(0).unwrap(),
        counters: Default::default(),
    };
    let counters = NetCounters::default();
    let mergeable = data.first().is_some_and(|b| b & 1 == 1);
    for _ in 0..4 {
        if !deliver_frame_with(&mem, &mut aq, frame, mergeable, &counters, || {
            common::mutate(&mem, data)
        }) {
            break;
        }
    }
});
