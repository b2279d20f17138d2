//! One listing of the destination, taken before a message's copies where each copy needs a
//! look at its destination first (`before-copy`): one `ListObjectsV2` instead of a HEAD per
//! object.
//!
//! Promises: a destination the listing proves absent is copied straight away (still
//! conditionally); one it lists, one past the listed page, or any once the listing is older
//! than [`LOOKAHEAD_VALID`], gets its HEAD as before (a HEAD, too, is only as fresh as its
//! round trip: on a server that ignores `If-None-Match` no check closes the race with a live
//! upload, AWS closes it).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::aws::S3;
use common::listing;

/// How long a [`Lookahead`] stands in for a HEAD: a destination it proved absent is copied
/// without a HEAD only this soon after the listing (a message whose copies are slowed by
/// retries HEADs its later destinations again).
pub const LOOKAHEAD_VALID: Duration = Duration::from_secs(2);

/// What one listing saw of a message's destinations.
#[derive(Debug)]
pub struct Lookahead {
    present: HashSet<String>,
    /// Every key up to this one was listed; `None`: every key after the start (the page was
    /// the last).
    seen_through: Option<String>,
    taken: Instant,
}

impl Lookahead {
    /// Lists `destinations` (at least one) in `bucket` at once; `None` when the listing fails
    /// (each key then gets its HEAD).
    ///
    /// The listing starts just below the smallest key (after that key without its last
    /// character) under the keys' common prefix, and asks for a few more keys than there are:
    /// keys of others between them (live uploads) end the page early, and the keys past it
    /// are HEADed.
    pub async fn list(s3: &S3, bucket: &str, destinations: &[String]) -> Option<Lookahead> {
        let mut after = destinations.iter().min()?.clone();
        after.pop();
        let max_keys = (2 * destinations.len() + 8).min(1000) as i32;
        let taken = Instant::now();
        let after = Some(after.as_str()).filter(|a| !a.is_empty());
        match listing::page(s3, bucket, common_prefix(destinations), None, after, max_keys).await {
            Ok((objects, next)) => {
                let seen_through = match next {
                    None => None,
                    Some(_) => Some(objects.last()?.key.clone()),
                };
                Some(Lookahead { present: objects.into_iter().map(|o| o.key).collect(), seen_through, taken })
            }
            Err(err) => {
                tracing::debug!(error = format!("{err:#}"), "a HEAD before each copy: the listing failed");
                None
            }
        }
    }

    /// Whether the listing proved `key` absent, recently enough to skip its HEAD.
    pub fn proves_absent(&self, key: &str) -> bool {
        self.taken.elapsed() <= LOOKAHEAD_VALID
            && !self.present.contains(key)
            && self.seen_through.as_deref().is_none_or(|last| key <= last)
    }
}

/// The longest prefix all `keys` share, cut back to a character boundary.
fn common_prefix(keys: &[String]) -> &str {
    let Some(first) = keys.first() else { return "" };
    let mut len = first.len();
    for key in &keys[1..] {
        len = len.min(first.bytes().zip(key.bytes()).take_while(|(a, b)| a == b).count());
    }
    while !first.is_char_boundary(len) {
        len -= 1;
    }
    &first[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookahead(present: &[&str], seen_through: Option<&str>, age: Duration) -> Lookahead {
        Lookahead {
            present: present.iter().map(|k| k.to_string()).collect(),
            seen_through: seen_through.map(str::to_owned),
            taken: Instant::now().checked_sub(age).expect("the clock has run this long"),
        }
    }

    #[test]
    fn a_lookahead_proves_absent_only_what_it_saw_not_listed_and_only_while_fresh() {
        let whole = lookahead(&["avatar/b"], None, Duration::ZERO);
        assert!(whole.proves_absent("avatar/a"));
        assert!(!whole.proves_absent("avatar/b"), "listed: present");
        assert!(whole.proves_absent("avatar/z"), "the page was the last: nothing after it exists");

        let page = lookahead(&["avatar/b", "avatar/c"], Some("avatar/c"), Duration::ZERO);
        assert!(page.proves_absent("avatar/a"));
        assert!(page.proves_absent("avatar/bb"), "between two listed keys");
        assert!(!page.proves_absent("avatar/c"));
        assert!(!page.proves_absent("avatar/ca"), "past the page: not seen");
        assert!(!page.proves_absent("avatar/d"));

        let stale = lookahead(&[], None, LOOKAHEAD_VALID + Duration::from_millis(10));
        assert!(!stale.proves_absent("avatar/a"), "too old to stand in for a HEAD");
    }

    #[test]
    fn the_common_prefix_stops_at_a_character_boundary() {
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(common_prefix(&keys(&["avatar/a-1", "avatar/a-2", "avatar/a-10"])), "avatar/a-");
        assert_eq!(common_prefix(&keys(&["avatar/x", "image/x"])), "");
        assert_eq!(common_prefix(&keys(&["avatar/only"])), "avatar/only");
        // 'é' (C3 A9) and 'è' (C3 A8) share their first byte, which is no prefix of its own.
        assert_eq!(common_prefix(&keys(&["avatar/é", "avatar/è"])), "avatar/");
        assert_eq!(common_prefix(&[]), "");
    }
}
