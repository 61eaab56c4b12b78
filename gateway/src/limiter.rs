//! Keyed rate limits (per API key, per client IP) on `governor`'s GCRA.
//!
//! Semantics (unchanged from the token buckets before): every key has a bucket of
//! `burst` tokens refilled at `rate` per second; a request takes one token, a batch of
//! `n` messages takes `n`. A take of more than `burst` tokens passes only when the
//! bucket is full and leaves it in debt (`n - burst` tokens below empty), so the rate
//! still holds. A refusal says how many whole seconds (at least 1) until the tokens are
//! there (`Retry-After`).
//!
//! Memory: a key is kept only while its bucket is not full again; `spawn_cleanup`
//! forgets the others periodically (`retain_recent`), so a flood of distinct keys (IPs)
//! costs memory for about `burst / rate` seconds, not forever.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::Quota;
use tokio_util::sync::CancellationToken;

/// The limiter's state: shared so a batch's debt can be written to its key's bucket.
#[derive(Clone, Default)]
struct Buckets(Arc<DashMapStateStore<String>>);

impl StateStore for Buckets {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<String> for Buckets {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Token buckets keyed by API key id or client IP.
pub struct RateLimiter {
    limiter: governor::RateLimiter<String, Buckets, MonotonicClock>,
    buckets: Buckets,
    clock: MonotonicClock,
    burst: NonZeroU32,
    /// Time one token takes to come back.
    per_token: Duration,
}

impl RateLimiter {
    /// `rate_per_sec` tokens per second, `burst` at most; both at least 1.
    pub fn new(rate_per_sec: u32, burst: u32) -> RateLimiter {
        let rate = NonZeroU32::new(rate_per_sec.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(burst.max(1)).expect("at least 1");
        let quota = Quota::per_second(rate).allow_burst(burst);
        let buckets = Buckets::default();
        RateLimiter {
            limiter: governor::RateLimiter::new(quota, buckets.clone(), MonotonicClock),
            buckets,
            clock: MonotonicClock,
            burst,
            per_token: quota.replenish_interval(),
        }
    }

    /// Ok, or how many whole seconds to wait.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        self.check_n(key, 1)
    }

    /// Takes `n` tokens at once (a batch of `n` messages). More than the burst passes
    /// when the bucket is full and leaves it in debt, so the rate still holds.
    pub fn check_n(&self, key: &str, n: u32) -> Result<(), u64> {
        let key = key.to_owned();
        let take = NonZeroU32::new(n.max(1))
            .expect("at least 1")
            .min(self.burst);
        match self.limiter.check_key_n(&key, take) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                return Err((wait.as_secs_f64().ceil() as u64).max(1));
            }
            // `take` is at most the burst, which always fits.
            Err(_) => unreachable!("a take of at most the burst fits the bucket"),
        }
        let debt = n.saturating_sub(self.burst.get());
        if debt > 0 {
            // The theoretical arrival time moves on by the tokens taken beyond the
            // burst: the bucket refills that much later.
            let extra = Nanos::from(self.per_token * debt);
            let _ = self
                .buckets
                .measure_and_replace(&key, |tat| -> Result<((), Nanos), ()> {
                    Ok(((), tat.unwrap_or_default() + extra))
                });
        }
        Ok(())
    }

    pub fn check_ip(&self, ip: std::net::IpAddr) -> Result<(), u64> {
        self.check(&ip.to_string())
    }

    /// Keys tracked now (buckets not known to be full again).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// Forgets the keys whose bucket is full again (indistinguishable from a new key).
    pub fn cleanup(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// How often `spawn_cleanup` runs: the time a bucket takes to refill from empty,
    /// between 1 s and 60 s.
    pub fn cleanup_interval(&self) -> Duration {
        (self.per_token * self.burst.get()).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Runs `cleanup` every `cleanup_interval` until `stop` is cancelled.
    pub fn spawn_cleanup(self: &Arc<Self>, stop: CancellationToken) {
        let limiter = Arc::downgrade(self);
        let every = self.cleanup_interval();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                match limiter.upgrade() {
                    Some(l) => l.cleanup(),
                    None => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_refuses() {
        let rl = RateLimiter::new(1, 3);
        assert!(rl.check("k").is_ok());
        assert!(rl.check("k").is_ok());
        assert!(rl.check("k").is_ok());
        assert_eq!(rl.check("k"), Err(1));
        assert!(rl.check("other").is_ok());
    }

    #[test]
    fn batches_take_one_token_per_item() {
        let rl = RateLimiter::new(1, 10);
        assert!(rl.check_n("k", 8).is_ok());
        // 2 tokens left: 8 more are 6 seconds away, and refusing takes nothing.
        assert_eq!(rl.check_n("k", 8), Err(6));
        assert!(rl.check_n("k", 2).is_ok());
        assert_eq!(rl.check("k"), Err(1));
    }

    #[test]
    fn more_than_the_burst_passes_when_full_and_leaves_debt() {
        let rl = RateLimiter::new(1, 3);
        assert!(rl.check_n("k", 2).is_ok());
        // Not full: 5 > burst needs the whole burst (3), 1 token is there.
        assert_eq!(rl.check_n("k", 5), Err(2));
        let full = RateLimiter::new(1, 3);
        assert!(full.check_n("k", 5).is_ok());
        // 2 tokens of debt: one token is 3 seconds away, the whole burst 5.
        assert_eq!(full.check("k"), Err(3));
        assert_eq!(full.check_n("k", 3), Err(5));
    }

    #[test]
    fn the_rate_refills_tokens() {
        let rl = RateLimiter::new(20, 1);
        assert!(rl.check("k").is_ok());
        assert_eq!(rl.check("k"), Err(1));
        std::thread::sleep(Duration::from_millis(60));
        assert!(rl.check("k").is_ok());
    }

    #[test]
    fn cleanup_forgets_refilled_keys_so_many_keys_do_not_grow_memory() {
        // 1000 tokens a second, burst 1: a bucket is full again 1 ms after its take.
        let rl = RateLimiter::new(1000, 1);
        for round in 0..3 {
            for i in 0..20_000u32 {
                assert!(rl
                    .check(&format!("10.{round}.{}.{}", i / 256, i % 256))
                    .is_ok());
            }
            assert!(rl.len() >= 20_000, "{}", rl.len());
            std::thread::sleep(Duration::from_millis(20));
            rl.cleanup();
            assert_eq!(rl.len(), 0, "round {round}");
        }
        // A key still in its window is kept, and still limited.
        let slow = RateLimiter::new(1, 1);
        assert!(slow.check("a").is_ok());
        for i in 0..1000 {
            assert!(slow.check(&format!("b{i}")).is_ok());
        }
        slow.cleanup();
        assert_eq!(slow.len(), 1001);
        assert_eq!(slow.check("a"), Err(1));
    }
}
