//! The bounded in-memory caches (token, sync, membership, refusal): quick_cache's S3-FIFO caches, each
//! weighed in estimated bytes (`CacheBudget`). Chosen over moka, measured with `benches/memory.rs` and
//! `benches/micro.rs` (BENCHMARKS.md): a fraction of moka's per-entry overhead and a lock-striped read
//! without moka's read-recording. Entries carry their own expiry, checked on every read by the caller;
//! an expired entry left behind only takes a slot until it is evicted, within the same byte bound.

use super::CacheBudget;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use std::hash::Hash;

/// What an entry costs, in heap bytes beyond the cache's own bookkeeping.
pub trait HeapSize {
    fn heap_size(&self) -> usize;
}

impl<T: HeapSize> HeapSize for std::sync::Arc<T> {
    fn heap_size(&self) -> usize {
        // The Arc's two counters, then the value.
        16 + (**self).heap_size()
    }
}

#[derive(Clone)]
struct ByBudget(CacheBudget);

impl<K, V: HeapSize> Weighter<K, V> for ByBudget {
    fn weight(&self, _: &K, v: &V) -> u64 {
        u64::from(self.0.weigh(v.heap_size()))
    }
}

/// A cache bounded by a [`CacheBudget`]; with no budget (`--token-cache-size 0`) it holds nothing.
pub struct Bounded<K, V> {
    inner: Option<Cache<K, V, ByBudget>>,
}

impl<K: Eq + Hash + Clone, V: Clone + HeapSize> Bounded<K, V> {
    pub fn new(budget: CacheBudget) -> Self {
        let inner = budget.enabled().then(|| {
            // The estimate only sizes the ghost list (keys recently evicted); tables start empty and
            // grow with use, so an idle process holds nothing.
            let estimate = usize::try_from(budget.entries.min(1 << 22)).unwrap_or(1 << 22);
            Cache::with(
                estimate,
                budget.bytes,
                ByBudget(budget),
                Default::default(),
                Default::default(),
            )
        });
        Self { inner }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.inner.as_ref()?.get(key)
    }

    pub fn insert(&self, key: K, value: V) {
        if let Some(c) = &self.inner {
            c.insert(key, value);
        }
    }

    pub fn remove(&self, key: &K) {
        if let Some(c) = &self.inner {
            c.remove(key);
        }
    }

    /// Removes the entry under `key` if `f` accepts its value (not one inserted since by someone else).
    pub fn remove_if(&self, key: &K, f: impl FnOnce(&V) -> bool) {
        if let Some(c) = &self.inner {
            c.remove_if(key, f);
        }
    }

    /// Keeps only the entries `keep` accepts (a scan: for invalidations, which are rare).
    pub fn retain(&self, keep: impl Fn(&K, &V) -> bool) {
        if let Some(c) = &self.inner {
            c.retain(keep);
        }
    }

    pub fn clear(&self) {
        if let Some(c) = &self.inner {
            c.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, Cache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The estimated bytes held (the sum of the entries' weights).
    pub fn weight(&self) -> u64 {
        self.inner.as_ref().map_or(0, Cache::weight)
    }

    /// Inserts `value` unless the key is present; `true` when this call inserted it. Concurrent callers
    /// for one key: exactly one inserts.
    pub async fn insert_if_absent(&self, key: K, value: V) -> bool {
        let Some(c) = &self.inner else {
            return true;
        };
        match c.get_value_or_guard_async(&key).await {
            Ok(_) => false,
            Err(guard) => {
                let _ = guard.insert(value);
                true
            }
        }
    }
}
