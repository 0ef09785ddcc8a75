//! One issuer's key cache: background refresh, single-flight refetch on an unknown `kid` with a cooldown,
//! and stale-if-error (the last good keys stay in use through an IdP outage, up to a maximum age).

use super::keys::KeySet;
use super::source::{IdpClient, KeySource};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use url::Url;

#[derive(Clone, Debug)]
pub struct KeyCacheOptions {
    /// How often keys are refreshed in the background.
    pub refresh_interval: Duration,
    /// Least time between two refetches triggered by unknown `kid`s (forged ones must not hammer the IdP).
    pub refetch_cooldown: Duration,
    /// How long the last good keys are used when the source keeps failing.
    pub max_stale: Duration,
    /// How often a key file is checked for changes.
    pub file_poll: Duration,
}

/// Why a fetch happens; logged, and decides whether discovery is redone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    Scheduled,
    UnknownKid,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Scheduled => "scheduled",
            Self::UnknownKid => "unknown_kid",
        }
    }
}

struct RefreshState {
    /// Last refetch caused by an unknown `kid`; the cooldown counts from it, so scheduled loads
    /// never delay picking up a rotation.
    last_on_demand: Option<Instant>,
    /// The `jwks_uri` discovery returned; refetches on unknown `kid` go straight to it.
    jwks_uri: Option<Url>,
}

pub struct IssuerKeys {
    issuer: String,
    source: KeySource,
    client: IdpClient,
    opts: KeyCacheOptions,
    current: ArcSwapOption<KeySet>,
    /// Bumped on every successful load; waiters compare it to know someone else already fetched.
    generation: AtomicU64,
    refresh: tokio::sync::Mutex<RefreshState>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl IssuerKeys {
    pub fn new(
        issuer: String,
        source: KeySource,
        client: IdpClient,
        opts: KeyCacheOptions,
    ) -> Self {
        Self {
            issuer,
            source,
            client,
            opts,
            current: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            refresh: tokio::sync::Mutex::new(RefreshState {
                last_on_demand: None,
                jwks_uri: None,
            }),
            last_error: std::sync::Mutex::new(None),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The keys, if there are any and they are not older than the maximum age.
    pub fn usable(&self) -> Result<Arc<KeySet>, String> {
        let Some(set) = self.current.load_full() else {
            return Err(match self.last_error() {
                Some(e) => format!("no keys loaded yet for {}: {e}", self.issuer),
                None => format!("no keys loaded yet for {}", self.issuer),
            });
        };
        let age = set.fetched_at.elapsed();
        if age > self.opts.max_stale {
            return Err(format!(
                "keys for {} are {}s old, past the maximum age of {}s; last error: {}",
                self.issuer,
                age.as_secs(),
                self.opts.max_stale.as_secs(),
                self.last_error().unwrap_or_else(|| "none".into())
            ));
        }
        Ok(set)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    /// Fetches now unless another caller fetched since `seen_generation` (then its result is shared) or
    /// the last attempt is within the cooldown. Returns whether newer keys are available than `seen_generation`.
    pub async fn refetch(&self, seen_generation: u64, trigger: Trigger) -> bool {
        let mut state = self.refresh.lock().await;
        if self.generation() != seen_generation {
            return true;
        }
        if trigger == Trigger::UnknownKid
            && state
                .last_on_demand
                .is_some_and(|t| t.elapsed() < self.opts.refetch_cooldown)
        {
            metrics::counter!("idsync_jwks_refetch_suppressed_total", "issuer" => self.issuer.clone())
                .increment(1);
            return false;
        }
        self.load(&mut state, trigger).await
    }

    async fn load(&self, state: &mut RefreshState, trigger: Trigger) -> bool {
        if trigger == Trigger::UnknownKid {
            state.last_on_demand = Some(Instant::now());
        }
        let result = match &self.source {
            KeySource::Discovery => match (&state.jwks_uri, trigger) {
                (Some(uri), Trigger::UnknownKid) => self.client.jwks(uri).await,
                _ => self.client.discover(&self.issuer).await.map(|(uri, set)| {
                    state.jwks_uri = Some(uri);
                    set
                }),
            },
            KeySource::JwksUri(uri) => self.client.jwks(uri).await,
            KeySource::File(path) => match tokio::fs::read(path).await {
                Err(e) => Err(format!("cannot read key file {}: {e}", path.display())),
                Ok(bytes) => KeySet::from_file_bytes(&bytes)
                    .map_err(|e| format!("key file {}: {e}", path.display())),
            },
        };
        let issuer = self.issuer.clone();
        match result {
            Ok(set) => {
                let previous = self.current.load_full();
                let changed = previous.as_ref().is_none_or(|old| !old.same_kids(&set));
                if changed {
                    tracing::info!(
                        issuer = %self.issuer,
                        trigger = trigger.as_str(),
                        kids = ?set.kids(),
                        skipped = ?set.skipped,
                        "issuer keys loaded"
                    );
                }
                metrics::gauge!("idsync_jwks_keys", "issuer" => issuer.clone())
                    .set(set.keys.len() as f64);
                self.current.store(Some(Arc::new(set)));
                self.generation.fetch_add(1, Ordering::AcqRel);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                metrics::counter!("idsync_jwks_fetch_total", "issuer" => issuer, "outcome" => "ok")
                    .increment(1);
                true
            }
            Err(error) => {
                let kept = self.current.load_full();
                tracing::warn!(
                    issuer = %self.issuer,
                    trigger = trigger.as_str(),
                    %error,
                    cached_keys = kept.as_ref().map_or(0, |k| k.keys.len()),
                    cached_age_secs = kept.as_ref().map(|k| k.fetched_at.elapsed().as_secs()),
                    "issuer keys could not be fetched; keeping the last good keys"
                );
                metrics::counter!("idsync_jwks_fetch_total", "issuer" => issuer, "outcome" => "error").increment(1);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(error);
                }
                false
            }
        }
    }

    /// Loads keys once, now (for `idsync check` and `token inspect`); returns why it failed.
    pub async fn load_now(&self) -> Result<Arc<KeySet>, String> {
        let mut state = self.refresh.lock().await;
        if self.load(&mut state, Trigger::Startup).await {
            self.usable()
        } else {
            Err(self.last_error().unwrap_or_else(|| "unknown error".into()))
        }
    }

    /// The `jwks_uri` discovery found, if discovery ran.
    pub async fn discovered_jwks_uri(&self) -> Option<Url> {
        self.refresh.lock().await.jwks_uri.clone()
    }

    /// The background task: load with backoff until the first success, then refresh on schedule
    /// (retrying sooner while the source fails). Runs until aborted.
    pub async fn run(self: Arc<Self>) {
        let period = match self.source {
            KeySource::File(_) => self.opts.file_poll,
            _ => self.opts.refresh_interval,
        };
        let mut backoff = Duration::from_millis(250);
        let mut trigger = Trigger::Startup;
        loop {
            let ok = {
                let mut state = self.refresh.lock().await;
                self.load(&mut state, trigger).await
            };
            let delay = if ok {
                trigger = Trigger::Scheduled;
                backoff = Duration::from_millis(250);
                period
            } else {
                let d = backoff.min(period);
                backoff = (backoff * 2).min(Duration::from_secs(60));
                d
            };
            tokio::time::sleep(delay).await;
        }
    }
}
