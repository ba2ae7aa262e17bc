//! How a parked shard is woken by the control thread: an `eventfd` that the shard's `poll(2)` watches,
//! written by a [`Waker`] that flume calls when a command (or a fault) is queued for the shard. So the
//! control side keeps its plain `try_send` on a bounded flume channel, and the shard sleeps in exactly one
//! system call whatever it waits for — its sockets, its commands or its next deadline.

#![warn(missing_docs)]

use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use rustix::event::{eventfd, EventfdFlags};

/// The shard's doorbell: an `eventfd` counter, non-blocking.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// A new doorbell, not rung.
    pub fn new() -> std::io::Result<Arc<Doorbell>> {
        let fd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        Ok(Arc::new(Doorbell { fd }))
    }

    /// Rings it: the shard's next (or current) `poll` returns. Rings coalesce until [`Doorbell::answer`].
    pub fn ring(&self) {
        // An eventfd write fails only when the counter would overflow — then it is rung anyway.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears the rings so far (the shard then looks at everything that may have rung it).
    pub fn answer(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
    }

    /// A [`Waker`] that rings this doorbell.
    pub fn waker(self: &Arc<Self>) -> Waker {
        Waker::from(self.clone())
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Wake for Doorbell {
    fn wake(self: Arc<Self>) {
        self.ring();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

/// A flume receiver read without an executor: [`Inbox::take`] returns what is queued and leaves a
/// receive armed, so that the next `send` rings the doorbell.
pub struct Inbox<'a, T> {
    rx: &'a flume::Receiver<T>,
    pending: Option<flume::r#async::RecvFut<'a, T>>,
}

impl<'a, T> Inbox<'a, T> {
    /// An inbox on `rx` (nothing armed until the first [`Inbox::take`]).
    pub fn new(rx: &'a flume::Receiver<T>) -> Self {
        Inbox { rx, pending: None }
    }

    /// True when nothing is queued (one look at the channel, no system call): for the shard to check
    /// between reading its sockets and judging what it read, so that a command queued before a datagram
    /// arrived is seen even when `poll` returned before the doorbell rang.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The next queued value, if any; `Err` once every sender is gone. When it returns `Ok(None)` a
    /// receive is armed with `waker`.
    pub fn take(&mut self, waker: &Waker) -> Result<Option<T>, flume::RecvError> {
        let mut cx = Context::from_waker(waker);
        let fut = self.pending.get_or_insert_with(|| self.rx.recv_async());
        match Pin::new(fut).poll(&mut cx) {
            Poll::Ready(r) => {
                self.pending = None;
                r.map(Some)
            }
            Poll::Pending => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags, Timespec};

    fn rung(bell: &Doorbell) -> bool {
        let mut fds = [PollFd::new(bell, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).unwrap() == 1
    }

    #[test]
    fn a_send_rings_the_doorbell_once_armed() {
        let bell = Doorbell::new().unwrap();
        let waker = bell.waker();
        let (tx, rx) = flume::bounded(4);
        let mut inbox = Inbox::new(&rx);
        tx.try_send(1).unwrap();
        assert_eq!(inbox.take(&waker), Ok(Some(1)), "queued before arming");
        assert_eq!(inbox.take(&waker), Ok(None));
        assert!(!rung(&bell));
        assert!(inbox.is_empty());
        tx.try_send(2).unwrap();
        assert!(rung(&bell), "a send while armed rings");
        assert!(!inbox.is_empty(), "seen without the doorbell too");
        bell.answer();
        assert!(!rung(&bell), "answered");
        assert_eq!(inbox.take(&waker), Ok(Some(2)));
        assert_eq!(inbox.take(&waker), Ok(None));
        drop(tx);
        assert!(rung(&bell), "the last sender leaving rings too");
        assert_eq!(inbox.take(&waker), Err(flume::RecvError::Disconnected));
    }
}
