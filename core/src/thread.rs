//! Spawning a thread of the relay worker (the endpoint's, the sinks') with every signal blocked.
//!
//! The relay worker is a Postgres background worker whose signal handlers (SIGTERM, SIGHUP, SIGUSR1 latch
//! wake-ups...) must only ever run on its main thread. A new thread inherits the creator's signal mask, so the
//! mask is set to "everything blocked" around the spawn and restored right after: the new thread never
//! runs a Postgres signal handler, and the calling thread's mask is unchanged. This is the crate's only
//! `unsafe` code.
#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::thread::{Builder, JoinHandle};

/// Spawns `f` on a new named thread whose signal mask blocks all signals.
pub fn spawn_with_signals_blocked<F>(name: &str, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let mut all = MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the set behind the valid pointer it is given; it cannot fail for a
    // valid pointer.
    unsafe { libc::sigfillset(all.as_mut_ptr()) };
    // SAFETY: `all` was initialised by sigfillset above and `old` is a valid place for the previous mask;
    // pthread_sigmask only changes the calling thread's mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let spawned = Builder::new().name(name.to_string()).spawn(f);
    // SAFETY: `old` was filled in by the successful pthread_sigmask call above; restoring it returns this
    // thread to exactly the mask it had. A null pointer for the old set is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    spawned
}
