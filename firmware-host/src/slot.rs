//! A one-frame mailbox between capture and inference where the newest frame wins.
//!
//! A bounded channel of capacity one, except that a full channel does not block the sender
//! or turn the new frame away: the waiting frame is replaced and counted as dropped. So a
//! camera is never stalled by a slow model, and what the model sees is as fresh as it can
//! be. Replaced and consumed frames go to a small pool the capture side takes its next
//! buffer from, so steady-state capture does not allocate.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Buffers kept for reuse; two cover capture filling one while inference holds another.
const POOL_SIZE: usize = 2;

struct Inner<T> {
    item: Option<T>,
    pool: Vec<T>,
    closed: bool,
    dropped: u64,
}

/// What [`LatestSlot::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken<T> {
    Item(T),
    /// Nothing arrived within the timeout.
    Empty,
    /// The sender closed the slot and it is empty.
    Closed,
}

/// The mailbox; share it with `Arc`.
pub struct LatestSlot<T> {
    inner: Mutex<Inner<T>>,
    changed: Condvar,
}

impl<T> Default for LatestSlot<T> {
    fn default() -> Self {
        LatestSlot {
            inner: Mutex::new(Inner { item: None, pool: Vec::new(), closed: false, dropped: 0 }),
            changed: Condvar::new(),
        }
    }
}

impl<T> LatestSlot<T> {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panic elsewhere while holding the lock leaves plain data; keep going with it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts `item` in the slot without waiting; a frame still waiting there is dropped
    /// (its buffer goes to the pool). Returns whether one was dropped.
    pub fn put(&self, item: T) -> bool {
        let mut inner = self.lock();
        let dropped = match inner.item.replace(item) {
            Some(old) => {
                inner.dropped += 1;
                if inner.pool.len() < POOL_SIZE {
                    inner.pool.push(old);
                }
                true
            }
            None => false,
        };
        drop(inner);
        self.changed.notify_all();
        dropped
    }

    /// Puts `item` once the slot is empty (for offline sources, which may wait). Returns
    /// `false`, dropping the item, if the slot was closed meanwhile.
    pub fn put_waiting(&self, item: T) -> bool {
        let mut inner = self.lock();
        while inner.item.is_some() && !inner.closed {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        if inner.closed {
            return false;
        }
        inner.item = Some(item);
        drop(inner);
        self.changed.notify_all();
        true
    }

    /// Takes the waiting frame, waiting up to `timeout` for one.
    pub fn take(&self, timeout: Duration) -> Taken<T> {
        let mut inner = self.lock();
        if inner.item.is_none() && !inner.closed {
            inner = self
                .changed
                .wait_timeout_while(inner, timeout, |i| i.item.is_none() && !i.closed)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let taken = match inner.item.take() {
            Some(item) => Taken::Item(item),
            None if inner.closed => Taken::Closed,
            None => Taken::Empty,
        };
        drop(inner);
        self.changed.notify_all();
        taken
    }

    /// Gives a consumed buffer back for reuse.
    pub fn recycle(&self, item: T) {
        let mut inner = self.lock();
        if inner.pool.len() < POOL_SIZE {
            inner.pool.push(item);
        }
    }

    /// A buffer from the pool, if one is free.
    pub fn spare(&self) -> Option<T> {
        self.lock().pool.pop()
    }

    /// No more frames will come; wakes every waiter. A frame still waiting can be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Frames replaced before inference took them.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_newest_frame_wins_and_drops_are_counted() {
        let slot = LatestSlot::new();
        assert!(!slot.put(1));
        assert!(slot.put(2));
        assert!(slot.put(3));
        assert_eq!(slot.take(Duration::ZERO), Taken::Item(3));
        assert_eq!(slot.dropped(), 2);
        assert_eq!(slot.take(Duration::from_millis(1)), Taken::Empty);
        // Dropped frames' buffers are offered for reuse.
        assert!(slot.spare().is_some());
        slot.close();
        assert_eq!(slot.take(Duration::from_secs(5)), Taken::Closed);
    }

    #[test]
    fn a_slow_consumer_never_blocks_the_producer() {
        let slot = Arc::new(LatestSlot::new());
        let producer = {
            let slot = Arc::clone(&slot);
            std::thread::spawn(move || {
                for i in 0..10_000u32 {
                    slot.put(i);
                }
                slot.close();
            })
        };
        producer.join().expect("the producer finished without any take");
        assert_eq!(slot.take(Duration::ZERO), Taken::Item(9_999));
        assert_eq!(slot.dropped(), 9_999);
    }

    #[test]
    fn waiting_puts_hand_over_every_item_in_order() {
        let slot = Arc::new(LatestSlot::new());
        let producer = {
            let slot = Arc::clone(&slot);
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    assert!(slot.put_waiting(i));
                }
                slot.close();
            })
        };
        let mut got = Vec::new();
        loop {
            match slot.take(Duration::from_secs(5)) {
                Taken::Item(i) => got.push(i),
                Taken::Empty => continue,
                Taken::Closed => break,
            }
        }
        producer.join().expect("producer");
        assert_eq!(got, (0..200).collect::<Vec<_>>());
        assert_eq!(slot.dropped(), 0);
    }
}
