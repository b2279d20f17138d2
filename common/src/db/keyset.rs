//! Keyset pagination: a table read in pages in key order, each page fetched after the last key
//! of the one before (`WHERE key > $after ORDER BY key LIMIT n`), so a page costs the same
//! wherever it starts and rows written meanwhile are neither skipped before the position nor
//! read twice.

use std::future::Future;

/// Where a keyset read stands.
#[derive(Debug, Clone)]
pub struct Keyset<K> {
    after: K,
    done: bool,
}

impl<K: Clone> Keyset<K> {
    /// A read starting after `first` (the smallest key, or a position saved earlier).
    pub fn after(first: K) -> Self {
        Self { after: first, done: false }
    }

    /// The next page: `fetch` asked for the rows after the position, which moves to the key
    /// (`key`) of the page's last row. `None` once a page comes back empty.
    pub async fn next<T, E, Fut>(
        &mut self,
        fetch: impl FnOnce(K) -> Fut,
        key: impl FnOnce(&T) -> K,
    ) -> Result<Option<Vec<T>>, E>
    where
        Fut: Future<Output = Result<Vec<T>, E>>,
    {
        if self.done {
            return Ok(None);
        }
        let page = fetch(self.after.clone()).await?;
        match page.last() {
            Some(last) => self.after = key(last),
            None => {
                self.done = true;
                return Ok(None);
            }
        }
        Ok(Some(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_follow_the_last_key_until_a_page_is_empty() {
        let rows: Vec<i64> = (1..=7).collect();
        let fetch = |after: i64| {
            let page: Vec<i64> = rows.iter().copied().filter(|&r| r > after).take(3).collect();
            async move { Ok::<_, ()>(page) }
        };
        let mut keyset = Keyset::after(i64::MIN);
        let mut pages = Vec::new();
        while let Some(page) = keyset.next(fetch, |&r| r).await.unwrap() {
            pages.push(page);
        }
        assert_eq!(pages, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        assert_eq!(keyset.next(fetch, |&r| r).await, Ok(None), "stays done");
    }
}
