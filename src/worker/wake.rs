//! One descriptor for the worker to wait on (with its latch) for every wake
//! socket of its threads: `WaitLatchOrSocket` takes one socket, so with both
//! the endpoint's and the sinks' it waits on an epoll descriptor that holds
//! them (readable when either is). It is made again every loop turn, which
//! costs a few system calls and never holds a descriptor a thread that
//! restarted has closed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

#[derive(Default)]
pub struct WakeSet {
    epoll: Option<OwnedFd>,
}

impl WakeSet {
    /// The descriptor to wait on for `fds` (none, one of them, or the epoll
    /// descriptor holding them all).
    pub fn fd(&mut self, fds: &[RawFd]) -> Option<RawFd> {
        self.epoll = None;
        match fds {
            [] => None,
            [one] => Some(*one),
            _ => {
                // SAFETY: epoll_create1 has no memory arguments; a descriptor it
                // returns is ours alone and OwnedFd closes it.
                let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                if raw < 0 {
                    // Out of descriptors: wait on the first socket only; the
                    // latch and the poll interval still wake the worker.
                    return fds.first().copied();
                }
                // SAFETY: `raw` is a descriptor just returned to us.
                let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
                for fd in fds {
                    let mut event = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: *fd as u64,
                    };
                    // SAFETY: both descriptors are open (the wake sockets live as
                    // long as their threads' links, which outlive this turn's
                    // wait) and `event` is a valid epoll_event.
                    unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, *fd, &mut event) };
                }
                let fd = epoll.as_raw_fd();
                self.epoll = Some(epoll);
                Some(fd)
            }
        }
    }
}
