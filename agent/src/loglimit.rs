//! Rate limit for refusal log lines: each (source, destination, reason) is written at most once
//! per window, and the next line says how many were suppressed since the last one. A flood of
//! refused connections then costs a few lines, not a disk; the metrics still count every one.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

/// How long one key stays quiet after a line.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Keys remembered at most: a flood from ever new sources cannot grow memory without bound.
const MAX_KEYS: usize = 8192;

/// The key of a refusal line: source address (without port: every new connection has a new
/// one), destination, and the policy or reason.
pub type RefusalKey = (String, String, String);

#[derive(Debug)]
struct Entry {
    last: Instant,
    suppressed: u64,
}

/// Decides which lines are written. The clock is passed in, so tests need not sleep.
#[derive(Debug)]
pub struct LogLimiter<K> {
    window: Duration,
    max_keys: usize,
    state: Mutex<State<K>>,
}

#[derive(Debug)]
struct State<K> {
    keys: HashMap<K, Entry>,
    /// Lines suppressed because the key table was full; reported with the next written line.
    overflow: u64,
}

impl<K: Hash + Eq> LogLimiter<K> {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self { window, max_keys, state: Mutex::new(State { keys: HashMap::new(), overflow: 0 }) }
    }

    /// `Some(n)`: write the line, and say that `n` were suppressed since the last one;
    /// `None`: suppress it.
    pub fn check_at(&self, key: K, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = st.keys.get_mut(&key) {
            if now.saturating_duration_since(e.last) < self.window {
                e.suppressed += 1;
                return None;
            }
            let n = std::mem::take(&mut e.suppressed);
            e.last = now;
            let overflow = std::mem::take(&mut st.overflow);
            return Some(n + overflow);
        }
        if st.keys.len() >= self.max_keys {
            // Forget keys whose window is over and that have nothing to report.
            let window = self.window;
            st.keys
                .retain(|_, e| now.saturating_duration_since(e.last) < window || e.suppressed > 0);
            if st.keys.len() >= self.max_keys {
                st.overflow += 1;
                return None;
            }
        }
        st.keys.insert(key, Entry { last: now, suppressed: 0 });
        Some(std::mem::take(&mut st.overflow))
    }

    pub fn check(&self, key: K) -> Option<u64> {
        self.check_at(key, Instant::now())
    }
}

/// The node's refusal log limiter (inbound tunnel refusals, the eBPF STRICT refusals, the
/// local servers' refusals).
pub fn refusals() -> &'static LogLimiter<RefusalKey> {
    static LIMITER: OnceLock<LogLimiter<RefusalKey>> = OnceLock::new();
    LIMITER.get_or_init(|| LogLimiter::new(WINDOW, MAX_KEYS))
}

/// Whether to write a refusal line for this key; `Some(suffix)` to append to it.
pub fn refusal(src: impl ToString, dst: impl ToString, reason: impl ToString) -> Option<String> {
    refusals().check((src.to_string(), dst.to_string(), reason.to_string())).map(suffix)
}

/// The text appended to a line after `n` suppressed ones.
pub fn suffix(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more suppressed in {}s)", WINDOW.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_and_window_then_the_count_of_suppressed() {
        let l = LogLimiter::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(l.check_at("a", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.check_at("a", t0 + Duration::from_secs(i)), None);
        }
        // Another key is not held back by the first.
        assert_eq!(l.check_at("b", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(l.check_at("a", t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.check_at("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(l.check_at("a", t0 + Duration::from_secs(25)), Some(1));
        assert_eq!(l.check_at("a", t0 + Duration::from_secs(40)), Some(0));
    }

    #[test]
    fn a_full_table_suppresses_new_keys_and_reports_them_later() {
        let l = LogLimiter::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(l.check_at(1, t0), Some(0));
        assert_eq!(l.check_at(2, t0), Some(0));
        assert_eq!(l.check_at(3, t0), None);
        assert_eq!(l.check_at(4, t0), None);
        // Once the window is over, quiet keys are forgotten and make room.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.check_at(5, later), Some(2));
        assert_eq!(l.check_at(5, later), None);
    }

    #[test]
    fn the_suffix_says_how_many() {
        assert_eq!(suffix(0), "");
        assert_eq!(suffix(3), " (3 more suppressed in 10s)");
    }
}
