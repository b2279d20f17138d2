//! Refusals that may not be about one object: an access denied or a KMS error on a copy is
//! either about that object (its own policy, its own key) or about every object (a grant
//! missing from the role, a bucket policy, a key policy). One refusal cannot tell which; the
//! objects around it can.
//!
//! Promises:
//! - a refused object is set aside (recorded, its message deleted) only once another object's
//!   copy has succeeded after the refusal: proof that the refusal was about that object;
//! - [`HALT_AFTER`] refusals in a row, with no copy succeeding in between, stop the process
//!   with one line naming the refusal and what to check; the refused objects' messages stay in
//!   the queue (nothing is set aside for a fault of the whole run);
//! - at most [`RECORDED_PER_STREAK`] refusals of one streak are recorded, so that
//!   `feeder failures` shows what happened without a record per object; when those objects
//!   later move, their records are removed ([`crate::process`]);
//! - a refusal that neither a success nor a halt settles within [`VERDICT_WAIT`] (the last
//!   objects of a run) is taken as about its object, as before.

use std::time::Duration;

use tokio::sync::watch;

/// Refusals in a row that stop the process.
pub const HALT_AFTER: u32 = 10;
/// Refusals of one streak recorded for the operator.
pub const RECORDED_PER_STREAK: u32 = 3;
/// How long a refusal waits for a success or a halt to settle it.
pub const VERDICT_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// Copies that succeeded so far.
    successes: u64,
    /// Refusals since the last success.
    streak: u32,
    halted: bool,
}

/// The process's view of refusals; one per consumer, shared by every worker.
#[derive(Debug)]
pub struct Refusals {
    seen: watch::Sender<Seen>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self { seen: watch::channel(Seen::default()).0 }
    }
}

/// One refusal, as registered.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    successes_before: u64,
    /// Its place in the streak (1 for the first refusal after a success).
    pub in_a_row: u32,
}

impl Refusal {
    /// Whether this refusal is to be recorded at once.
    pub fn recorded(&self) -> bool {
        self.in_a_row <= RECORDED_PER_STREAK
    }

    /// Whether this refusal is the one that stops the process.
    pub fn halts(&self) -> bool {
        self.in_a_row == HALT_AFTER
    }
}

/// What the objects around a refusal said about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// About its object: set it aside.
    OneObject,
    /// About every object: keep its message; the process stops.
    Systemic,
}

impl Refusals {
    /// A copy succeeded: the refusals before it were about their objects.
    pub fn succeeded(&self) {
        self.seen.send_modify(|s| {
            s.successes += 1;
            s.streak = 0;
        });
    }

    /// Registers a refusal.
    pub fn refused(&self) -> Refusal {
        let mut refusal = None;
        self.seen.send_modify(|s| {
            s.streak = s.streak.saturating_add(1);
            s.halted |= s.streak >= HALT_AFTER;
            refusal = Some(Refusal { successes_before: s.successes, in_a_row: s.streak });
        });
        refusal.expect("send_modify runs its closure")
    }

    /// Waits until a success (about its object) or a halt (about every object) settles the
    /// refusal, at most `wait` (then: about its object).
    pub async fn verdict(&self, refusal: &Refusal, wait: Duration) -> Verdict {
        let mut seen = self.seen.subscribe();
        let settled = seen.wait_for(|s| s.halted || s.successes > refusal.successes_before);
        match tokio::time::timeout(wait, settled).await {
            Ok(Ok(s)) if s.halted => Verdict::Systemic,
            _ => Verdict::OneObject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_refusal_followed_by_a_success_is_about_its_object() {
        let refusals = Refusals::default();
        let first = refusals.refused();
        assert!(first.recorded() && !first.halts());
        refusals.succeeded();
        assert_eq!(refusals.verdict(&first, VERDICT_WAIT).await, Verdict::OneObject);
        assert_eq!(refusals.refused().in_a_row, 1, "a success ends the streak");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_in_a_row_halt_and_only_the_first_few_are_recorded() {
        let refusals = std::sync::Arc::new(Refusals::default());
        let all: Vec<Refusal> = (0..HALT_AFTER).map(|_| refusals.refused()).collect();
        assert_eq!(all.iter().filter(|r| r.recorded()).count() as u32, RECORDED_PER_STREAK);
        assert_eq!(all.iter().filter(|r| r.halts()).count(), 1);
        for r in &all {
            assert_eq!(refusals.verdict(r, VERDICT_WAIT).await, Verdict::Systemic);
        }
        // A success after the halt does not make the earlier refusals about their objects.
        refusals.succeeded();
        assert_eq!(refusals.verdict(&all[0], VERDICT_WAIT).await, Verdict::Systemic);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_left_unsettled_is_about_its_object() {
        let refusals = Refusals::default();
        let only = refusals.refused();
        let begun = tokio::time::Instant::now();
        assert_eq!(refusals.verdict(&only, Duration::from_secs(20)).await, Verdict::OneObject);
        assert_eq!(begun.elapsed(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_refusal_is_settled_by_a_later_success() {
        let refusals = std::sync::Arc::new(Refusals::default());
        let one = refusals.refused();
        let waiting = tokio::spawn({
            let refusals = refusals.clone();
            async move { refusals.verdict(&one, VERDICT_WAIT).await }
        });
        tokio::task::yield_now().await;
        refusals.succeeded();
        assert_eq!(waiting.await.unwrap(), Verdict::OneObject);
    }
}
