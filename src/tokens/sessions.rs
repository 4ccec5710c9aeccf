//! Counting the client sessions logged in to an account, for the status
//! page: a guard per session that counts down when the session ends,
//! however it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One open session; dropping it closes the count.
#[must_use = "the session counts as open only while this is held"]
pub struct SessionOpen(Arc<AtomicUsize>);

impl SessionOpen {
    pub(crate) fn new(count: Arc<AtomicUsize>) -> SessionOpen {
        count.fetch_add(1, Ordering::Relaxed);
        SessionOpen(count)
    }
}

impl Drop for SessionOpen {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_up_and_down() {
        let n = Arc::new(AtomicUsize::new(0));
        let a = SessionOpen::new(n.clone());
        let b = SessionOpen::new(n.clone());
        assert_eq!(n.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(n.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(n.load(Ordering::Relaxed), 0);
    }
}
