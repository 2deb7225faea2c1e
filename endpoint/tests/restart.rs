//! The endpoint thread dies (a panic): the worker notices without spinning, and a new endpoint binds the
//! same port and serves.

mod common;

use std::time::Duration;

use changerelay_endpoint::{Auth, Status, ToEndpoint, Wake};
use common::*;
use serde_json::json;

#[test]
fn start_panic_detect_restart_serve() {
    let mut cfg = test_config(Auth::Trust);
    cfg.debug_panic_path = true;
    let (endpoint, port) = changerelay_endpoint::start(cfg.clone()).unwrap();
    let addr = endpoint.local_addrs()[0];
    assert!(endpoint.is_running());
    assert_eq!(port.drain_wake(), Wake::Open);
    // Kill the thread through the debug hook (the request gets no answer).
    let _ = std::panic::catch_unwind(|| get(addr, "/debug/panic", &[]));
    assert!(
        wait_until(Duration::from_secs(2), || !endpoint.is_running()),
        "the thread ended"
    );
    // The wake socket is readable at end-of-file, and says so once: no busy loop for the worker.
    let mut fds = libc::pollfd {
        fd: port.wake_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: (a test) one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut fds, 1, 1000) }, 1);
    assert_eq!(port.drain_wake(), Wake::Closed);
    assert!(port.try_recv().is_none() && port.is_closed());
    endpoint.publish(ToEndpoint::Status(Status::default())); // ignored, never blocks
                                                             // The listener was closed with the thread: the same port binds again.
    drop(endpoint);
    drop(port);
    cfg.listen = vec![addr];
    let fake = Fake::start(cfg);
    assert_eq!(fake.addr, addr);
    assert_eq!(get(addr, "/health", &[]).status, 200);
    let mut ws = ws_connect(addr, "/ws");
    subscribe(
        &mut ws,
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}),
    );
    fake.commit_n("parameters", 1, 1, 0);
    assert_eq!(read_changes(&mut ws, 1)[0]["new"]["id"], 1);
}

#[test]
fn the_debug_hook_is_off_by_default() {
    let fake = Fake::trust();
    assert_eq!(get(fake.addr, "/debug/panic", &[]).status, 404);
    assert_eq!(get(fake.addr, "/health", &[]).status, 200);
}
