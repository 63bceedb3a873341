//! Cooperative cancellation of long library calls (collect, predict): a front end that cannot
//! kill the computing thread (the Python bindings on Ctrl-C) calls [`request`]; the long loops
//! call [`check`] between batches and stop with an "interrupted" error. Everything already
//! written stays (collect's finished parts), so the same call resumes.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks the running long call to stop at its next check.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Clears a request (before starting a new call).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// An "interrupted" error when a stop was requested.
pub fn check() -> anyhow::Result<()> {
    if requested() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_then_clear() {
        super::clear();
        assert!(super::check().is_ok());
        super::request();
        assert_eq!(super::check().unwrap_err().to_string(), "interrupted");
        super::clear();
        assert!(!super::requested());
    }
}
