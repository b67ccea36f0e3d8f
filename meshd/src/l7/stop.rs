//! Telling every client connection that meshd is stopping.
//!
//! A connection waits for the signal alongside its own I/O, so the wait is polled on every
//! wakeup of the connection, once or twice per request. A `watch` channel re-registers its
//! waker under the channel's lock on each of those polls (it showed in the request path's
//! profile); here a connection registers its task's waker once, and every later poll is
//! one atomic load.
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    task::{Context, Poll, Waker},
};

#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waker>>,
}

impl StopSignal {
    /// Stops: every `stopping` future resolves, now or when next polled.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for (_, w) in self.waiting.lock().unwrap().drain() {
            w.wake();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Resolves once `stop` is called. Meant for one task: the waker of its first poll is
    /// the one woken.
    pub fn stopping(&self) -> Stopping<'_> {
        Stopping {
            signal: self,
            key: None,
        }
    }
}

pub struct Stopping<'a> {
    signal: &'a StopSignal,
    key: Option<u64>,
}

impl Future for Stopping<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_stopped() {
            return Poll::Ready(());
        }
        if self.key.is_none() {
            let key = self.signal.next.fetch_add(1, Ordering::Relaxed);
            self.signal
                .waiting
                .lock()
                .unwrap()
                .insert(key, cx.waker().clone());
            self.key = Some(key);
            // A stop between the first check and the registration drained the list
            // before this waker was in it.
            if self.signal.is_stopped() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl Drop for Stopping<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.signal.waiting.lock().unwrap().remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::Duration};

    #[tokio::test]
    async fn every_waiting_task_wakes_and_later_ones_resolve_at_once() {
        let signal = Arc::new(StopSignal::default());
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let s = signal.clone();
                tokio::spawn(async move { s.stopping().await })
            })
            .collect();
        // Each has registered (or will see the flag): poll them all first.
        tokio::task::yield_now().await;
        assert!(!signal.is_stopped());
        signal.stop();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("a waiting task was not woken")
                .unwrap();
        }
        signal.stopping().await;
        assert!(signal.waiting.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_nothing_registered() {
        let signal = StopSignal::default();
        let r = tokio::time::timeout(Duration::from_millis(20), signal.stopping()).await;
        assert!(r.is_err(), "resolved without a stop");
        assert!(signal.waiting.lock().unwrap().is_empty());
    }
}
