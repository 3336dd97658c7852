//! The uploads in progress in this process (S3 multipart and Swift segments), so that a
//! signal's cleanup thread can cancel each one and wait until it has removed what it wrote:
//! an interrupted upload leaves no object, no open multipart upload and no segments.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One upload's cancellation: set by [`abort_all`], seen by the upload between requests and
/// while it waits for one; `done` is raised once the upload has cleaned up.
pub(crate) struct Cancel {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
    done: Mutex<bool>,
    cv: Condvar,
}

impl Cancel {
    /// Whether the upload was cancelled.
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once the upload is cancelled (at once if it already is).
    pub(crate) async fn wait(&self) {
        loop {
            // Made before the flag is read: notify_waiters wakes a Notified that exists,
            // polled or not, so a cancellation between the two is never missed.
            let n = self.notify.notified();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

static ACTIVE: Mutex<Vec<Arc<Cancel>>> = Mutex::new(Vec::new());

/// Cancel every registered upload and wait (up to 30 s in all) until each has cleaned up.
pub(crate) fn abort_all() {
    let active: Vec<Arc<Cancel>> = ACTIVE.lock().map(|v| v.clone()).unwrap_or_default();
    for c in &active {
        c.flag.store(true, Ordering::SeqCst);
        c.notify.notify_waiters();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in &active {
        let mut done = c.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            done =
                c.cv.wait_timeout(done, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        }
    }
}

/// Registers an upload with [`abort_all`] for its lifetime; raises `done` when dropped,
/// which the upload does only after its cleanup.
pub(crate) struct Registered(pub(crate) Arc<Cancel>);

impl Registered {
    pub(crate) fn new() -> Self {
        let c = Arc::new(Cancel {
            flag: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            done: Mutex::new(false),
            cv: Condvar::new(),
        });
        if let Ok(mut v) = ACTIVE.lock() {
            v.push(c.clone());
        }
        Registered(c)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut v) = ACTIVE.lock() {
            v.retain(|c| !Arc::ptr_eq(c, &self.0));
        }
        *self.0.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.0.cv.notify_all();
    }
}
