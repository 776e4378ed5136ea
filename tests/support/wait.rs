//! Polling helpers.

use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it returns true; panics mentioning `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    if !wait_for(timeout, f) {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
}

/// Polls `f` every 50 ms until it returns true (then true) or `timeout` passes (then false).
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
