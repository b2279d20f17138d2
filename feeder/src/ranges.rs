//! Key ranges listed at once (`LIST_RANGES`): listing 300 M keys one page of 1,000 after the
//! other takes hours, and S3 cannot list from the middle of a prefix except after a key.
//!
//! Promises:
//! - the ranges cover the key space after the start exactly: range `i` holds the keys `k` with
//!   `after_i < k <= until_i`, `until_i == after_{i+1}`, the first range starts after the
//!   listing's start and the last one has no end, so every key is in exactly one range,
//!   whatever the split points are;
//! - split points only balance the work: they are found by asking S3 which prefixes exist one
//!   character deeper than the source prefix (one `ListObjectsV2` of one key per prefix found,
//!   at most [`MAX_PROBES`]), going deeper until there are a few prefixes per range, then
//!   cutting the sorted prefixes into runs of equal length. Keys with a long common part
//!   (`image/avatar-123.png`) are split below that common part.

use std::sync::Arc;

use crate::store::ranges::KeyRange;
use futures::{StreamExt, TryStreamExt};

use crate::list::Lister;

/// Listing requests spent at most on finding split points.
pub(crate) const MAX_PROBES: usize = 512;
/// Prefixes wanted per range before cutting.
const PREFIXES_PER_RANGE: usize = 4;
/// How deep below the source prefix split points are looked for.
const MAX_DEPTH: usize = 32;

/// Splits the keys after `start` into at most `want` ranges (fewer when there are fewer
/// prefixes to split at; one when `want` is 1).
pub(crate) async fn plan(lister: &Arc<Lister>, start: Option<&str>, want: usize) -> anyhow::Result<Vec<KeyRange>> {
    let points = if want > 1 { split_points(lister, start, want).await? } else { Vec::new() };
    Ok(ranges(start, points))
}

/// Ranges between consecutive split points (sorted, all after `start`).
pub(crate) fn ranges(start: Option<&str>, points: Vec<String>) -> Vec<KeyRange> {
    let lower: Vec<_> = std::iter::once(start.map(str::to_owned)).chain(points.iter().cloned().map(Some)).collect();
    let upper = points.into_iter().map(Some).chain(std::iter::once(None));
    lower
        .into_iter()
        .zip(upper)
        .enumerate()
        .map(|(no, (after, until))| KeyRange { no: no as i32, after, until, ..KeyRange::default() })
        .collect()
}

async fn split_points(lister: &Arc<Lister>, start: Option<&str>, want: usize) -> anyhow::Result<Vec<String>> {
    let mut frontier = vec![lister.prefix.clone()];
    let mut probes = 0;
    for _ in 0..MAX_DEPTH {
        if frontier.len() >= want * PREFIXES_PER_RANGE || probes >= MAX_PROBES {
            break;
        }
        let budget = MAX_PROBES - probes;
        let expanded: Vec<(Vec<String>, usize)> = futures::stream::iter(frontier.iter())
            .map(|p| children(lister, p, start, budget))
            .buffered(16)
            .try_collect()
            .await?;
        probes += expanded.iter().map(|(_, n)| n).sum::<usize>();
        if probes > MAX_PROBES {
            break; // Some prefix was not explored to its end: keep the last complete level.
        }
        let next: Vec<String> = frontier
            .iter()
            .zip(expanded)
            .flat_map(|(p, (children, _))| if children.is_empty() { vec![p.clone()] } else { children })
            .collect();
        if next == frontier {
            break; // Nothing deeper.
        }
        frontier = next;
    }
    frontier.sort();
    let per_range = frontier.len().div_ceil(want).max(1);
    // Each run of prefixes after the first starts a range; its first prefix is the split point
    // (keys that begin with it sort after it).
    Ok(frontier.chunks(per_range).skip(1).map(|run| run[0].clone()).filter(|p| Some(p.as_str()) > start).collect())
}

/// The prefixes one character longer than `prefix` that begin a key after `start`, and the
/// requests spent (stops past `budget`). A prefix that is itself a key with no longer keys
/// has no children.
async fn children(
    lister: &Lister,
    prefix: &str,
    start: Option<&str>,
    budget: usize,
) -> anyhow::Result<(Vec<String>, usize)> {
    let mut found: Vec<String> = Vec::new();
    let mut cursor = match start {
        Some(s) if s > prefix => s.to_owned(),
        _ => prefix.to_owned(),
    };
    let mut spent = 0;
    while spent <= budget {
        spent += 1;
        let Some(key) = lister.first_key_after(prefix, &cursor).await? else { break };
        let Some(next) = key[prefix.len()..].chars().next() else { break };
        let child = format!("{prefix}{next}");
        if found.last() == Some(&child) {
            break; // Keys made of the highest characters: not worth splitting further.
        }
        // Past every key that begins with `child`, short of keys with four U+10FFFF after it.
        cursor = format!("{child}{}", "\u{10FFFF}".repeat(4));
        found.push(child);
    }
    Ok((found, spent))
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn ranges_meet_end_to_end() {
        let r = ranges(Some("image/0"), vec!["image/b".into(), "image/m".into()]);
        let bounds: Vec<_> = r.iter().map(|r| (r.no, r.after.as_deref(), r.until.as_deref())).collect();
        assert_eq!(
            bounds,
            vec![
                (0, Some("image/0"), Some("image/b")),
                (1, Some("image/b"), Some("image/m")),
                (2, Some("image/m"), None)
            ]
        );
        assert_eq!(ranges(None, vec![]).len(), 1);
        assert_eq!(ranges(None, vec![])[0].after, None);
    }
}
