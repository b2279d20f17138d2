//! The pace of copies: one controller per consumer, for both copy paths (direct and SDK).
//!
//! S3 refuses writes above a rate per prefix with 503 SlowDown (or 429). The controller paces
//! copy *starts* at a rate it learns from those refusals: a rate, not a count of copies in
//! flight, because S3's limit is a rate (requests per second per prefix), and copies in flight
//! are that rate times a latency that moves with the load.
//!
//! Promises:
//! - a consumer's copies start along a ramp ([`SLOW_START`] a second, doubling every
//!   [`RAMP_DOUBLING`], a seventh of a second to [`RAMP_END`]), then are not paced until S3 first
//!   asks to slow down (`CONCURRENCY` bounds them): a fleet that starts, or a consumer that
//!   joins a fleet at S3's limit, does not send its whole `CONCURRENCY` at once, as TCP's slow
//!   start does not;
//! - a slow-down cuts the rate to [`BACK_OFF`] of what it was (of the starts of the last second,
//!   the first time), once per round: a refusal of a copy started before the last cut does
//!   not cut again, so a burst of refusals from one overshoot is one cut, not a collapse;
//! - while copies wait for the pace and none is refused, the rate grows by [`GROWTH`] a
//!   second, so a limit that rises (S3 splitting a partition, an operator's cap lifted) is
//!   found within seconds, and a rate nobody waits for does not grow;
//! - copies start spaced by 1 / rate: refused copies are tried again through the same pace,
//!   never all at once;
//! - the operator's cap (this consumer's share of `MAX_COPIES_PER_SECOND`, [`Pace::set_cap`])
//!   bounds the rate whatever S3 allows; the learned rate does not grow while the cap binds.
//!
//! Why not the SDK's adaptive retries (`aws-smithy-runtime`'s client rate limiter) or rclone's
//! pacer: the SDK cuts to 0.7 of its measured rate on *every* throttled answer (one overshoot
//! with 100 copies in flight is many cuts) and climbs back along a cubic curve that is slow
//! near the old maximum; rclone's pacer doubles a sleep between calls on each retry and decays
//! it on success, one call at a time. Both leave a quarter of a fixed limit unused in our
//! measurements (issue: 0.73 of the allowed rate). A gentle cut once per round and a growth
//! that only happens while the pace binds keep the offered rate close above the limit.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use tokio::time::Instant;

/// A slow-down cuts the rate to this share.
pub(crate) const BACK_OFF: f64 = 0.9;
/// Growth of the rate per second while copies wait for it and none is refused, in the first
/// [`DOUBLING`] after a cut; it doubles every [`DOUBLING`] since (up to 64 times), so that the
/// pace stays gentle near a limit it keeps meeting and climbs back fast after a long
/// throttle (from 1 to 1,000 copies a second in about 13 s), or when consumers leave and the
/// others must grow into their share.
pub(crate) const GROWTH: f64 = 0.05;
/// See [`GROWTH`].
pub(crate) const DOUBLING: Duration = Duration::from_secs(2);
/// The rate never falls below this (copies per second).
pub(crate) const MIN_RATE: f64 = 1.0;
/// Copies per second at a consumer's first copy; see [`RAMP_DOUBLING`].
pub(crate) const SLOW_START: f64 = 200.0;
/// The ramp doubles its rate this often until [`RAMP_END`], or until S3 first asks to slow
/// down.
pub(crate) const RAMP_DOUBLING: Duration = Duration::from_millis(25);
/// Past this rate the ramp ends: copies are not paced until S3 asks to slow down.
pub(crate) const RAMP_END: f64 = 10_000.0;
/// How far behind its schedule a pace may run and catch up (starts a timer's coarse ticks
/// bunched together); an idle pace banks nothing beyond it.
const SLACK: Duration = Duration::from_millis(10);

#[derive(Debug)]
struct State {
    /// Copies per second learned from S3; `None`: no slow-down seen yet.
    rate: Option<f64>,
    /// The operator's cap for this consumer, copies per second.
    cap: Option<f64>,
    /// When the next copy may start.
    next_start: Instant,
    /// Bumped at each cut: refusals of copies started before it do not cut again.
    round: u64,
    /// When the rate last grew (or was cut).
    grown_at: Instant,
    /// When the rate was last cut.
    cut_at: Instant,
    /// Whether a copy waited for the pace since then.
    bound: bool,
    /// Starts of the last second, before the first cut (the first cut's base).
    recent: VecDeque<Instant>,
    /// The first start: where the ramp begins, and the first cut's base in the process's first
    /// second.
    first: Option<Instant>,
}

/// The controller; one per consumer, shared by every copy.
#[derive(Debug)]
pub(crate) struct Pace {
    state: Mutex<State>,
    /// Held by the copy waiting for its start: the others queue behind it.
    turn: tokio::sync::Mutex<()>,
    /// Metrics: the rate (0 while not paced) and the slow-downs.
    rate_gauge: Gauge<f64, AtomicU64>,
    slowed: Counter,
}

impl Default for Pace {
    fn default() -> Self {
        Self::new(Gauge::default(), Counter::default())
    }
}

impl Pace {
    /// A controller that shows its rate and counts slow-downs in these metrics.
    pub(crate) fn new(rate_gauge: Gauge<f64, AtomicU64>, slowed: Counter) -> Self {
        let now = Instant::now();
        Self {
            turn: tokio::sync::Mutex::new(()),
            rate_gauge,
            slowed,
            state: Mutex::new(State {
                rate: None,
                cap: None,
                next_start: now,
                round: 0,
                grown_at: now,
                cut_at: now,
                bound: false,
                recent: VecDeque::new(),
                first: None,
            }),
        }
    }
}

/// A copy's permission to start, with the round it started in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    round: u64,
}

impl Pace {
    /// Waits until the pace lets one more copy start.
    pub(crate) async fn start(&self) -> Start {
        // Copies wait their turn one at a time (first come, first served), so that only the
        // first waiter sleeps, and a new rate applies from the next start, not after the
        // starts already spaced at the old one.
        let _turn = self.turn.lock().await;
        loop {
            let at = {
                let mut s = self.state.lock().expect("never poisoned");
                let now = Instant::now();
                if s.grow(now) {
                    self.rate_gauge.set(s.effective().unwrap_or_default());
                }
                let start = Start { round: s.round };
                if s.rate.is_none() {
                    s.first.get_or_insert(now);
                }
                match s.pacing(now) {
                    None => {
                        s.note_start(now);
                        return start;
                    }
                    Some(rate) => {
                        // An idle pace banks no starts beyond [`SLACK`]; within it, starts
                        // that a coarse timer bunched together keep the average.
                        s.next_start = s.next_start.max(now.checked_sub(SLACK).unwrap_or(now));
                        if s.next_start <= now {
                            s.next_start += Duration::from_secs_f64(1.0 / rate);
                            s.note_start(now);
                            return start;
                        }
                        // Only the learned rate grows by binding, not the operator's cap.
                        s.bound |= s.rate.is_some_and(|r| s.cap.is_none_or(|c| r <= c));
                        s.next_start
                    }
                }
            };
            tokio::time::sleep_until(at).await;
        }
    }

    /// S3 asked to slow down a copy that started at `start`.
    pub(crate) fn slowed_down(&self, start: Start) {
        self.slowed.inc();
        let mut s = self.state.lock().expect("never poisoned");
        if start.round != s.round {
            return; // this overshoot was already answered
        }
        let now = Instant::now();
        let base = s.rate.or(s.cap).unwrap_or_else(|| {
            // Starts per second: of the last second, or of the time since the first start.
            let span = s.first.map_or(1.0, |first| now.duration_since(first).as_secs_f64().clamp(0.01, 1.0));
            s.recent.len() as f64 / span
        });
        s.rate = Some((base * BACK_OFF).max(MIN_RATE));
        self.rate_gauge.set(s.effective().unwrap_or_default());
        s.recent = VecDeque::new();
        s.round += 1;
        s.grown_at = now;
        s.cut_at = now;
        s.bound = false;
    }

    /// The rate copies are paced at now (copies per second: the learned rate or the cap,
    /// whichever is lower); `None` while not paced.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.state.lock().expect("never poisoned").effective()
    }

    /// Sets (or with `None` lifts) the operator's cap on this consumer's copies per second.
    pub(crate) fn set_cap(&self, cap: Option<f64>) {
        let mut s = self.state.lock().expect("never poisoned");
        s.cap = cap.map(|c| c.max(MIN_RATE / 10.0));
        self.rate_gauge.set(s.effective().unwrap_or_default());
    }

    /// Slow-downs met so far.
    #[cfg(test)]
    fn slow_downs(&self) -> u64 {
        self.slowed.get()
    }
}

impl State {
    /// The rate starts are spaced at now: the learned rate, the cap or the ramp, whichever is
    /// lowest; `None`: not paced.
    fn pacing(&self, now: Instant) -> Option<f64> {
        let ramp = self.rate.is_none().then(|| self.ramp(now)).flatten();
        match (self.effective(), ramp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The ramp's rate now, from the first start; `None` past [`RAMP_END`].
    fn ramp(&self, now: Instant) -> Option<f64> {
        let since = now.duration_since(self.first?);
        let rate = SLOW_START * 2f64.powf(since.as_secs_f64() / RAMP_DOUBLING.as_secs_f64());
        (rate < RAMP_END).then_some(rate)
    }

    /// Keeps the starts of the last second until the first cut, its base.
    fn note_start(&mut self, now: Instant) {
        if self.rate.is_some() {
            return;
        }
        self.recent.push_back(now);
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1)) {
            self.recent.pop_front();
        }
    }

    /// The learned rate or the cap, whichever is lower.
    fn effective(&self) -> Option<f64> {
        match (self.rate, self.cap) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }

    /// Grows the rate for the time since it last grew, if the pace bound meanwhile; whether it
    /// grew.
    fn grow(&mut self, now: Instant) -> bool {
        let Some(rate) = self.rate else { return false };
        let elapsed = now.duration_since(self.grown_at);
        if elapsed < Duration::from_millis(100) {
            return false;
        }
        let grew = self.bound;
        if grew {
            let doublings = (now.duration_since(self.cut_at).as_secs_f64() / DOUBLING.as_secs_f64()).min(6.0);
            let growth = GROWTH * 2f64.powf(doublings);
            self.rate = Some(rate * (1.0 + growth).powf(elapsed.as_secs_f64().min(1.0)));
        }
        self.grown_at = now;
        self.bound = false;
        grew
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts `limit(t)` copies per second (a token bucket holding a tenth of a
    /// second's worth, as the benchmark's proxy), driven by one copy after another for `secs`
    /// seconds of paused time; returns (accepted, refused).
    async fn against_a_limit(pace: &Pace, limit: impl Fn(f64) -> f64, secs: u64) -> (u64, u64) {
        let begun = Instant::now();
        let (mut accepted, mut refused) = (0, 0);
        let (mut tokens, mut last) = (0.0f64, 0.0f64);
        while begun.elapsed() < Duration::from_secs(secs) {
            let start = pace.start().await;
            let t = begun.elapsed().as_secs_f64();
            let rate = limit(t);
            tokens = (tokens + (t - last) * rate).min((rate / 10.0).max(1.0));
            last = t;
            if tokens >= 1.0 {
                tokens -= 1.0;
                accepted += 1;
            } else {
                refused += 1;
                pace.slowed_down(start);
            }
            // Unpaced, a copy takes 1 ms (a fast server): the offered rate is 1,000/s.
            if pace.rate().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        (accepted, refused)
    }

    /// Along the ramp, then unpaced until the first slow-down: the first copies are spaced
    /// (about seven in the first 25 ms), the ramp is over within a fifth of a second, and then
    /// copies start at once.
    #[tokio::test(start_paused = true)]
    async fn a_ramp_then_unpaced_until_the_first_slow_down() {
        let pace = Pace::default();
        let begun = Instant::now();
        let mut first = 0;
        for _ in 0..2000 {
            pace.start().await;
            if begun.elapsed() < RAMP_DOUBLING {
                first += 1;
            }
        }
        assert!((5..=10).contains(&first), "{first} copies in the first {RAMP_DOUBLING:?}");
        assert!(begun.elapsed() < Duration::from_millis(200), "the ramp took {:?}", begun.elapsed());
        let begun = Instant::now();
        for _ in 0..1000 {
            pace.start().await;
        }
        assert_eq!(begun.elapsed(), Duration::ZERO);
        assert_eq!(pace.rate(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn one_cut_per_round() {
        let pace = Pace::default();
        let starts: Vec<Start> = futures::future::join_all((0..100).map(|_| pace.start())).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        for start in &starts {
            pace.slowed_down(*start);
        }
        assert_eq!(pace.rate(), Some(90.0), "100 refusals of one overshoot: one cut, from 100 starts a second");
        assert_eq!(pace.slow_downs(), 100);
    }

    /// Against a fixed limit of 200 copies a second, the pace settles just above it: at least
    /// 95 % of the limit accepted once settled, at most 5 % of the copies refused.
    #[tokio::test(start_paused = true)]
    async fn rides_a_fixed_limit() {
        let pace = Pace::default();
        against_a_limit(&pace, |_| 200.0, 20).await; // settling
        let (accepted, refused) = against_a_limit(&pace, |_| 200.0, 60).await;
        let goodput = accepted as f64 / 60.0;
        assert!(goodput >= 0.95 * 200.0, "goodput {goodput}/s");
        assert!(refused as f64 <= 0.05 * (accepted + refused) as f64, "{refused} refused of {}", accepted + refused);
    }

    /// The operator's cap bounds the pace from the next copy on, without S3 refusing
    /// anything, and lifting it lets copies go unpaced again.
    #[tokio::test(start_paused = true)]
    async fn a_cap_bounds_the_pace() {
        let pace = Pace::default();
        pace.set_cap(Some(50.0));
        let begun = Instant::now();
        for _ in 0..101 {
            pace.start().await;
        }
        assert_eq!(begun.elapsed(), Duration::from_secs(2), "100 gaps of 20 ms");
        pace.set_cap(None);
        let begun = Instant::now();
        for _ in 0..100 {
            pace.start().await;
        }
        assert!(begun.elapsed() <= Duration::from_millis(20));
        assert_eq!(pace.rate(), None);
    }

    /// After S3 refused every copy for a minute (the pace at its floor), it is back at a
    /// limit of 1,000 a second within 30 s.
    #[tokio::test(start_paused = true)]
    async fn climbs_back_after_a_long_throttle() {
        let pace = Pace::default();
        against_a_limit(&pace, |_| 0.0, 60).await;
        assert_eq!(pace.rate(), Some(MIN_RATE));
        against_a_limit(&pace, |_| 1000.0, 30).await;
        let (accepted, _) = against_a_limit(&pace, |_| 1000.0, 10).await;
        let goodput = accepted as f64 / 10.0;
        assert!(goodput >= 0.95 * 1000.0, "30 s after the throttle ended: goodput {goodput}/s");
    }

    /// When the limit doubles, the pace follows within 30 s.
    #[tokio::test(start_paused = true)]
    async fn follows_a_limit_that_doubles() {
        let pace = Pace::default();
        against_a_limit(&pace, |_| 200.0, 20).await;
        against_a_limit(&pace, |_| 400.0, 30).await;
        let (accepted, _) = against_a_limit(&pace, |_| 400.0, 10).await;
        let goodput = accepted as f64 / 10.0;
        assert!(goodput >= 0.95 * 400.0, "30 s after the limit doubled: goodput {goodput}/s");
    }

    /// Consumers sharing one limit, each with its own pace and `in_flight` copies taking
    /// `latency` (the limit is met halfway), against one token bucket of `limit` a second (as
    /// the benchmark's proxy): (goodput as a share of the limit, share of copies refused),
    /// counted after `settle` seconds, over `secs`.
    async fn sharing(consumers: usize, limit: f64, latency: Duration, settle: u64, secs: u64) -> (f64, f64) {
        use std::sync::Arc;
        struct Bucket {
            tokens: f64,
            filled_at: Instant,
            accepted: u64,
            refused: u64,
        }
        let bucket = Arc::new(Mutex::new(Bucket { tokens: 0.0, filled_at: Instant::now(), accepted: 0, refused: 0 }));
        let begun = Instant::now();
        let end = Duration::from_secs(settle + secs);
        let mut fleet = Vec::new();
        for _ in 0..consumers {
            let (pace, in_flight, bucket) =
                (Arc::new(Pace::default()), Arc::new(tokio::sync::Semaphore::new(128)), bucket.clone());
            fleet.push(tokio::spawn(async move {
                while begun.elapsed() < end {
                    let permit = in_flight.clone().acquire_owned().await.expect("open");
                    let start = pace.start().await;
                    let (pace, bucket) = (pace.clone(), bucket.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(latency / 2).await;
                        let accepted = {
                            let mut b = bucket.lock().unwrap();
                            let now = Instant::now();
                            b.tokens = (b.tokens + now.duration_since(b.filled_at).as_secs_f64() * limit)
                                .min((limit / 10.0).max(1.0));
                            b.filled_at = now;
                            let counted = u64::from(begun.elapsed() >= Duration::from_secs(settle));
                            if b.tokens >= 1.0 {
                                b.tokens -= 1.0;
                                b.accepted += counted;
                                true
                            } else {
                                b.refused += counted;
                                false
                            }
                        };
                        tokio::time::sleep(latency / 2).await;
                        if !accepted {
                            pace.slowed_down(start);
                        }
                        drop(permit);
                    });
                }
            }));
        }
        for consumer in fleet {
            consumer.await.unwrap();
        }
        let b = bucket.lock().unwrap();
        (b.accepted as f64 / secs as f64 / limit, b.refused as f64 / (b.accepted + b.refused) as f64)
    }

    /// Consumers that share one limit converge on it without talking to each other: with 2,
    /// 4 and 8 of them (128 copies in flight each, 50 ms a copy), at least 95 % of the limit
    /// accepted once settled and at most 5 % of the copies refused.
    #[tokio::test(start_paused = true)]
    async fn consumers_sharing_a_limit_converge_on_it() {
        for consumers in [2, 4, 8] {
            let (goodput, refused) = sharing(consumers, 200.0, Duration::from_millis(50), 20, 60).await;
            assert!(goodput >= 0.95, "{consumers} consumers: goodput {goodput:.3} of the limit");
            assert!(refused <= 0.05, "{consumers} consumers: {:.1} % refused", refused * 100.0);
        }
    }
}
