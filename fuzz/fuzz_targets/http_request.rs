//! Raw bytes as one client connection through the endpoint's real request handling (hyper's parser, routing,
//! Host/Origin checks, authorization, the WebSocket handshake and frame loop), without sockets. The first
//! byte picks trust or token authentication.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    changerelay_endpoint::fuzzing::http_request(bytes, mode & 1 == 1);
});
