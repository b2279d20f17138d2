//! Refusals that may not be about one object: an access denied or a KMS error on a copy is
//! either about that object (its own policy, its own key) or about every object (a grant
//! missing from the role, a bucket policy, a key policy). One refusal cannot tell which; the
//! objects around it can.
//!
//! Promises:
//! - a refused object is set aside (recorded, its message deleted) only once [`WINDOW`] more
//!   objects were decided after it without a halt: proof that the refusal was about that
//!   object;
//! - [`HALT_AFTER`] refusals in a row, with no copy succeeding in between, or [`WINDOW_HALT`]
//!   among the last [`WINDOW`] objects decided (a refusal that strikes every other object: a
//!   key policy for some of the objects, a bucket policy on part of the prefix), stop the
//!   process with one line naming the refusal and what to check; the refused objects'
//!   messages stay in the queue (nothing is set aside for a fault of the whole run);
//! - at most [`RECORDED_PER_STREAK`] refusals among the last [`WINDOW`] objects are recorded
//!   when the process stops, so that `feeder failures` shows what happened without a record
//!   per object; when those objects later move, their records are removed
//!   ([`crate::process`]);
//! - when no object at all is decided for [`QUIET`] while a refusal waits (a run's last
//!   objects; a consumer working on few objects at once), the refusals so far decide:
//!   [`QUIET_HALT_AFTER`] or more in a row, this one among them, stop the process (a grant
//!   gone near the end of a run); fewer are about their objects when a copy succeeded after
//!   them, and otherwise settle nothing: the message comes back (an SQS outage in the middle
//!   of a systemic refusal never sets its objects aside one by one).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;

/// Refusals in a row that stop the process.
pub const HALT_AFTER: u32 = 10;
/// The objects decided last that a share of refusals is counted over.
pub const WINDOW: u32 = 40;
/// Refusals among the last [`WINDOW`] objects that stop the process: half of them.
pub const WINDOW_HALT: u32 = WINDOW / 2;
/// Refusals recorded for the operator when the process stops.
pub const RECORDED_PER_STREAK: u32 = 3;
/// How long a refusal waits, with no object decided meanwhile, before the refusals so far
/// decide it.
pub const QUIET: Duration = Duration::from_secs(5);
/// Refusals in a row, with no object decided after them for [`QUIET`] (a run's last objects,
/// where ten in a row may never come), that stop the process.
pub const QUIET_HALT_AFTER: u32 = 3;

#[derive(Debug, Clone, Default)]
struct Seen {
    /// Objects decided so far: copied, or refused.
    decided: u64,
    /// Refusals since the last success.
    streak: u32,
    /// `decided` at the last success: a refusal decided after it is in the current streak.
    last_success: u64,
    /// The last [`WINDOW`] objects decided: `true` for a refusal.
    recent: VecDeque<bool>,
    halted: bool,
}

impl Seen {
    fn decide(&mut self, refused: bool) {
        self.decided += 1;
        if self.recent.len() == WINDOW as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(refused);
    }

    fn refused_recently(&self) -> u32 {
        self.recent.iter().filter(|refused| **refused).count() as u32
    }
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
    decided_before: u64,
    /// Its place in the streak (1 for the first refusal after a success).
    pub in_a_row: u32,
    /// Refusals among the last [`WINDOW`] objects, this one included.
    pub in_window: u32,
    halts: bool,
}

impl Refusal {
    /// Whether this refusal is to be recorded when the process stops.
    pub fn recorded(&self) -> bool {
        self.in_window <= RECORDED_PER_STREAK
    }

    /// Whether this refusal is the one that stops the process.
    pub fn halts(&self) -> bool {
        self.halts
    }
}

/// What the objects around a refusal said about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// About its object: set it aside.
    OneObject,
    /// About every object: keep its message; the process stops.
    Systemic,
    /// About every object, and this verdict is the one that stops the process: this many
    /// refusals in a row, and then no object decided for the quiet time.
    Halts { in_a_row: u32 },
    /// Nothing tells: fewer than [`QUIET_HALT_AFTER`] refusals in a row, then no object
    /// decided for the quiet time and no copy succeeding since (the queue unreachable for a
    /// while, a consumer just started). Its message comes back; on its last delivery the
    /// object is recorded `retries_exhausted` with the refusal.
    Unsettled,
}

impl Refusals {
    /// A copy succeeded: the streak of refusals ends.
    pub fn succeeded(&self) {
        self.seen.send_modify(|s| {
            s.decide(false);
            s.streak = 0;
            s.last_success = s.decided;
        });
    }

    /// Registers a refusal.
    pub fn refused(&self) -> Refusal {
        let mut refusal = None;
        self.seen.send_modify(|s| {
            let decided_before = s.decided;
            s.decide(true);
            s.streak = s.streak.saturating_add(1);
            let in_window = s.refused_recently();
            let halts = !s.halted && (s.streak >= HALT_AFTER || in_window >= WINDOW_HALT);
            s.halted |= halts;
            refusal = Some(Refusal { decided_before, in_a_row: s.streak, in_window, halts });
        });
        refusal.expect("send_modify runs its closure")
    }

    /// Waits until [`WINDOW`] more objects are decided without a halt (about its object) or a
    /// halt (about every object) settles the refusal; when no object at all is decided for
    /// `quiet` (a run's last objects; a consumer working on few at once, whose other objects
    /// wait for this one's message), about its object if a copy succeeded after it, else
    /// unsettled.
    pub async fn verdict(&self, refusal: &Refusal, quiet: Duration) -> Verdict {
        let mut seen = self.seen.subscribe();
        loop {
            {
                let s = seen.borrow_and_update();
                if s.halted {
                    return Verdict::Systemic;
                }
                if s.decided > refusal.decided_before + u64::from(WINDOW) {
                    return Verdict::OneObject;
                }
            }
            if !matches!(tokio::time::timeout(quiet, seen.changed()).await, Ok(Ok(()))) {
                // Nothing decided for `quiet` (few objects left): the refusals in a row so far
                // tell. [`QUIET_HALT_AFTER`] of them with no success since stop the process.
                let mut verdict = Verdict::Unsettled;
                self.seen.send_modify(|s| {
                    if s.halted {
                        verdict = Verdict::Systemic;
                    } else if s.streak >= QUIET_HALT_AFTER && refusal.decided_before >= s.last_success {
                        s.halted = true;
                        verdict = Verdict::Halts { in_a_row: s.streak };
                    } else if s.last_success > refusal.decided_before {
                        // A copy succeeded after it: the grant works; the refusal is its own.
                        verdict = Verdict::OneObject;
                    }
                });
                return verdict;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_refusal_followed_by_a_window_of_successes_is_about_its_object() {
        let refusals = Refusals::default();
        let first = refusals.refused();
        assert!(!first.halts());
        for _ in 0..WINDOW {
            refusals.succeeded();
        }
        assert_eq!(refusals.verdict(&first, QUIET).await, Verdict::OneObject);
        assert_eq!(refusals.refused().in_a_row, 1, "a success ends the streak");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_in_a_row_halt_and_only_the_first_few_are_recorded() {
        let refusals = std::sync::Arc::new(Refusals::default());
        for _ in 0..5 {
            refusals.succeeded();
        }
        let all: Vec<Refusal> = (0..HALT_AFTER).map(|_| refusals.refused()).collect();
        assert_eq!(all.iter().filter(|r| r.recorded()).count() as u32, RECORDED_PER_STREAK);
        assert_eq!(all.iter().filter(|r| r.halts()).count(), 1);
        assert!(all.last().unwrap().halts());
        for r in &all {
            assert_eq!(refusals.verdict(r, QUIET).await, Verdict::Systemic);
        }
        // Later objects do not make the earlier refusals about their objects.
        for _ in 0..=WINDOW {
            refusals.succeeded();
        }
        assert_eq!(refusals.verdict(&all[0], QUIET).await, Verdict::Systemic);
        assert!(!refusals.refused().halts(), "one refusal stops the process");
    }

    /// Every other object refused (never ten in a row): half the window halts, before any
    /// of those refusals is set aside, and only the first few are recorded.
    #[tokio::test(start_paused = true)]
    async fn half_of_a_window_refused_halts() {
        let refusals = std::sync::Arc::new(Refusals::default());
        let mut all = Vec::new();
        for _ in 0..WINDOW_HALT {
            all.push(refusals.refused());
            refusals.succeeded();
        }
        assert!(all.iter().all(|r| r.in_a_row == 1));
        assert_eq!(all.iter().filter(|r| r.halts()).count(), 1);
        assert!(all.last().unwrap().halts());
        assert_eq!(all.iter().filter(|r| r.recorded()).count() as u32, RECORDED_PER_STREAK);
        for r in &all {
            assert_eq!(refusals.verdict(r, QUIET).await, Verdict::Systemic);
        }
    }

    /// A share under half does not halt: each refusal is about its object.
    #[tokio::test(start_paused = true)]
    async fn a_third_refused_is_about_those_objects() {
        let refusals = Refusals::default();
        let mut all = Vec::new();
        for _ in 0..3 * WINDOW {
            all.push(refusals.refused());
            refusals.succeeded();
            refusals.succeeded();
        }
        assert!(all.iter().all(|r| !r.halts()));
        let begun = tokio::time::Instant::now();
        let settled = &all[..all.len() - WINDOW as usize / 3 - 1];
        for r in settled {
            assert_eq!(refusals.verdict(r, QUIET).await, Verdict::OneObject);
        }
        assert_eq!(begun.elapsed(), Duration::ZERO, "settled by the objects after them");
    }

    /// At a run's end, where ten in a row may never come: three refusals in a row and then
    /// nothing decided stop the process (one verdict says so, the others are systemic); two
    /// do not.
    #[tokio::test(start_paused = true)]
    async fn refusals_in_a_row_then_quiet_halt() {
        let refusals = Refusals::default();
        refusals.succeeded();
        let two: Vec<Refusal> = (0..2).map(|_| refusals.refused()).collect();
        assert_eq!(refusals.verdict(&two[1], QUIET).await, Verdict::Unsettled);
        let third = refusals.refused();
        assert_eq!(refusals.verdict(&third, QUIET).await, Verdict::Halts { in_a_row: 3 });
        assert_eq!(refusals.verdict(&two[0], QUIET).await, Verdict::Systemic);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_refusal_is_about_its_object_only_when_a_copy_succeeded_after_it() {
        let refusals = Refusals::default();
        let only = refusals.refused();
        refusals.succeeded();
        let begun = tokio::time::Instant::now();
        assert_eq!(refusals.verdict(&only, QUIET).await, Verdict::OneObject);
        assert_eq!(begun.elapsed(), QUIET, "no object decided meanwhile");
        // One refusal, then nothing at all (SQS out of reach): nothing tells.
        let last = refusals.refused();
        assert_eq!(refusals.verdict(&last, QUIET).await, Verdict::Unsettled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_refusal_is_settled_by_later_successes() {
        let refusals = std::sync::Arc::new(Refusals::default());
        let one = refusals.refused();
        let waiting = tokio::spawn({
            let refusals = refusals.clone();
            async move { refusals.verdict(&one, QUIET).await }
        });
        tokio::task::yield_now().await;
        for _ in 0..WINDOW {
            refusals.succeeded();
        }
        assert_eq!(waiting.await.unwrap(), Verdict::OneObject);
    }
}
