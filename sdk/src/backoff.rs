//! Full-jitter exponential backoff: the n-th consecutive failure waits a uniformly
//! random time in `[0, min(max, min * 2^n)]` (AWS "full jitter"). Pure and
//! deterministic for a given RNG, so it is unit-testable.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// `base` is the ceiling of the first delay (0.5 s by default), `cap` the largest
    /// ceiling (30 s by default).
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// Consecutive failures since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Ceiling of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Draws the next delay and counts one more failure.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling().as_millis() as u64;
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rng.gen_range(0..=ceiling))
    }

    /// After a healthy session: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = vec![];
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis() as u64);
            let d = b.next_delay(&mut rng);
            assert!(d.as_millis() as u64 <= *ceilings.last().unwrap());
        }
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
        assert_eq!(b.attempt(), 0);
    }

    #[test]
    fn delays_are_jittered_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut low = 0;
        let mut high = 0;
        for _ in 0..1000 {
            let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(30));
            let d = b.next_delay(&mut rng).as_millis();
            assert!(d <= 1000);
            if d < 250 {
                low += 1;
            }
            if d > 750 {
                high += 1;
            }
        }
        assert!(low > 150 && high > 150, "low {low} high {high}");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(30));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
    }
}
