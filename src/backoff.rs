//! Capped exponential backoff with jitter, for every reconnect loop (the xDS stream, the ZDS
//! session, SPIRE subscriptions): wait `delay` plus up to half of it at random, then double
//! `delay` up to the cap; a healthy session starts it over.

use std::time::Duration;

/// One reconnect loop's backoff.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    delay: Duration,
}

impl Backoff {
    /// Starts at `initial` and never waits more than `max` (plus jitter).
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            delay: initial,
        }
    }

    /// The next wait, given a random `roll` in `0..=u64::MAX`; advances the backoff.
    pub(crate) fn next_with(&mut self, roll: u64) -> Duration {
        let half = self.delay.as_millis() as u64 / 2;
        let wait = self.delay + Duration::from_millis(roll % (half + 1));
        self.delay = (self.delay * 2).min(self.max);
        wait
    }

    /// The next wait with a random jitter.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random())
    }

    /// Sleeps for the next wait.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// After a healthy session: the next failure waits `initial` again.
    pub(crate) fn reset(&mut self) {
        self.delay = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_at_most_half_of_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let waits: Vec<_> = (0..6).map(|_| b.next_with(0)).collect();
        assert_eq!(
            waits,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(b.next_with(u64::MAX), ms(1000) + ms(u64::MAX % 501));
        assert!(b.next_with(u64::MAX) <= ms(1500));
        b.reset();
        assert_eq!(b.next_with(0), ms(100));
        assert_eq!(b.next_with(50), ms(250), "jitter is added to the delay");
    }
}
