//! When to renew a certificate, as pure functions of the certificate's validity, the number of
//! failed attempts and a jitter value: no clock, no randomness of its own (docs/design.md §7).
//!
//! A certificate is renewed at half of its lifetime. A failed renewal is retried after a
//! capped, jittered exponential backoff, and never later than its expiry, so a recovering CA
//! is asked again before the old certificate runs out.

use std::time::{Duration, SystemTime};

/// First retry delay after a failed renewal.
pub(crate) const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(60);

/// The moment a certificate valid over `[not_before, not_after)` should be renewed.
pub(crate) fn refresh_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life / 2
}

/// How long to wait after the `failures`-th consecutive failed attempt. `jitter` in [0, 1)
/// spreads retries over [½, 1] of the exponential step, so a node's identities do not retry
/// in lockstep.
pub(crate) fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX));
    let step = exp.min(RETRY_CAP);
    step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// How long to sleep before the next renewal attempt, given the current certificate's validity
/// (if any), the failures since the last success, the time now and a jitter value.
pub(crate) fn next_attempt(
    current: Option<(SystemTime, SystemTime)>,
    failures: u32,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let Some((not_before, not_after)) = current else {
        // No certificate at all: keep asking, with backoff.
        return if failures == 0 {
            Duration::ZERO
        } else {
            retry_delay(failures, jitter)
        };
    };
    if failures > 0 {
        let retry = retry_delay(failures, jitter);
        // Never sleep past the expiry while a renewal is due.
        let left = not_after.duration_since(now).unwrap_or_default();
        return retry.min(left);
    }
    refresh_at(not_before, not_after)
        .duration_since(now)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn renews_at_half_of_the_lifetime() {
        assert_eq!(refresh_at(t(0), t(3600)), t(1800));
        assert_eq!(
            next_attempt(Some((t(0), t(3600))), 0, t(600), 0.3),
            Duration::from_secs(1200)
        );
        // Past the refresh point: at once.
        assert_eq!(
            next_attempt(Some((t(0), t(3600))), 0, t(2000), 0.3),
            Duration::ZERO
        );
    }

    #[test]
    fn retries_back_off_with_jitter_and_a_cap() {
        let cases = [
            (1, 0.0, Duration::from_millis(500)),
            (1, 0.999_999, Duration::from_millis(1000)),
            (2, 0.0, Duration::from_millis(1000)),
            (3, 0.0, Duration::from_millis(2000)),
            (10, 0.0, Duration::from_secs(30)),
            (10, 1.0, Duration::from_secs(60)),
            (40, 1.0, Duration::from_secs(60)),
        ];
        for (failures, jitter, want) in cases {
            let got = retry_delay(failures, jitter);
            assert!(
                got.abs_diff(want) < Duration::from_millis(1),
                "{failures}, {jitter}: {got:?}"
            );
        }
    }

    #[test]
    fn retries_never_sleep_past_expiry() {
        // 10 s left, backoff would say 60 s.
        assert_eq!(
            next_attempt(Some((t(0), t(3600))), 20, t(3590), 1.0),
            Duration::from_secs(10)
        );
        // Already expired: try again at once.
        assert_eq!(
            next_attempt(Some((t(0), t(3600))), 20, t(4000), 1.0),
            Duration::ZERO
        );
    }

    #[test]
    fn without_a_certificate_the_first_try_is_immediate() {
        assert_eq!(next_attempt(None, 0, t(0), 0.5), Duration::ZERO);
        assert!(next_attempt(None, 3, t(0), 0.5) > Duration::ZERO);
    }
}
