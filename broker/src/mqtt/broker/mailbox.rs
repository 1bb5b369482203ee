//! A connection's mailbox: what the broker hands a connection (deliveries, a
//! takeover), in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use super::message::{Delivery, ToConnection};

/// The broker's side of a connection's mailbox. A mailbox costs a few words until a
/// message waits in it, where an unbounded channel allocates 32 slots up front: at
/// 10,000 idle devices that was 24 MB.
pub(super) struct Outbox(Arc<Mailbox>);

/// The connection's side: what the broker sent, in order; `None` once the broker dropped
/// its side (the session moved on) and everything sent before was taken.
pub struct Inbox(Arc<Mailbox>);

#[derive(Default)]
struct Mailbox {
    queue: Mutex<VecDeque<ToConnection>>,
    ready: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

pub(super) fn mailbox() -> (Outbox, Inbox) {
    let shared = Arc::new(Mailbox::default());
    (Outbox(shared.clone()), Inbox(shared))
}

impl Outbox {
    pub(super) fn send(&self, message: ToConnection) {
        self.0.queue.lock().push_back(message);
        self.0.ready.notify_one();
    }

    /// Deliveries sent that the connection never took (it had ended).
    pub(super) fn take_stranded(&self) -> Vec<Delivery> {
        let mut queue = self.0.queue.lock();
        queue
            .drain(..)
            .filter_map(|m| match m {
                ToConnection::Deliver(d) => Some(d),
                ToConnection::TakenOver => None,
            })
            .collect()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.ready.notify_one();
    }
}

impl Inbox {
    /// Cancel-safe: a message is only taken when this returns it.
    pub async fn recv(&mut self) -> Option<ToConnection> {
        loop {
            if let Some(message) = self.0.queue.lock().pop_front() {
                return Some(message);
            }
            if self.0.closed.load(Ordering::Acquire) {
                return None;
            }
            // A send or close since the checks left a permit: this returns at once.
            self.0.ready.notified().await;
        }
    }
}
