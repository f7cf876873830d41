//! How long the feed waits, after a change, before it builds the next snapshot: the debounce,
//! or as long as the last build took if that was longer. Every build is O(cluster) (150,000
//! pods: a few hundred milliseconds); during a rollout's burst, changes arrive faster than
//! builds finish, and building back to back would take a whole CPU from the node's data plane
//! while each snapshot carries hardly more changes. Waiting as long as a build takes keeps the
//! feed to at most about half a CPU; the changes of the wait go into the next snapshot.

use std::time::Duration;

/// Changes arriving together (a rollout, a relist) are built into one snapshot.
pub(super) const DEBOUNCE: Duration = Duration::from_millis(100);
/// The longest wait: a slow build must not hold a change back much longer than it takes.
pub(super) const MAX_WAIT: Duration = Duration::from_millis(400);

/// The wait before the next build, after one that took `last_build`.
pub(super) fn wait(last_build: Duration) -> Duration {
    last_build.clamp(DEBOUNCE, MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_the_debounce_or_the_last_build_bounded() {
        assert_eq!(wait(Duration::ZERO), DEBOUNCE);
        assert_eq!(wait(Duration::from_millis(250)), Duration::from_millis(250));
        assert_eq!(wait(Duration::from_secs(3)), MAX_WAIT);
    }
}
