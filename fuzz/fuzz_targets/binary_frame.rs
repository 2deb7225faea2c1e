//! The binary frame decoder must refuse malformed frames without panicking or over-allocating.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = changerelay_core::binary::read_event(data);
});
