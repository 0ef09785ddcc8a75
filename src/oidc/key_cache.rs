//! One issuer's key cache: background refresh, single-flight refetch on an unknown `kid` with a cooldown,
//! and stale-if-error (the last good keys stay in use through an IdP outage, up to a maximum age).

use super::keys::KeySet;
use super::source::{FetchError, IdpClient, JwksFetch, KeySource};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Why an issuer has no keys to verify with right now. The message names the issuer and the cause: for
/// logs and readiness, not for API clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysUnavailable {
    #[error("no keys loaded yet for {issuer}{}", last_error(.last))]
    NotLoaded {
        issuer: String,
        last: Option<FetchError>,
    },
    #[error("keys for {issuer} are {age_secs}s old, past the maximum age of {max_secs}s{}", last_error(.last))]
    TooOld {
        issuer: String,
        age_secs: u64,
        max_secs: u64,
        last: Option<FetchError>,
    },
}

fn last_error(e: &Option<FetchError>) -> String {
    e.as_ref()
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default()
}

struct RefreshState {
    /// Last refetch caused by an unknown `kid`; the cooldown counts from it, so scheduled loads
    /// never delay picking up a rotation.
    last_on_demand: Option<Instant>,
    /// The `jwks_uri` discovery returned; refetches on unknown `kid` go straight to it.
    jwks_uri: Option<Url>,
    /// The JWKS answer's `ETag`, sent back as `If-None-Match` so an unchanged set costs the IdP a 304.
    etag: Option<String>,
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
    last_error: std::sync::Mutex<Option<FetchError>>,
    /// An unknown `kid` arrived during the cooldown: the background task refetches once it ends, so a key
    /// published right after a flood of forged ones (or a typo) waits at most one cooldown.
    deferred: AtomicBool,
    wake: tokio::sync::Notify,
}

impl IssuerKeys {
    pub fn new(
        issuer: String,
        source: KeySource,
        client: IdpClient,
        opts: KeyCacheOptions,
    ) -> Self {
        // Exposed at zero from the start, so rates and alerts on it work before the first suppression.
        metrics::counter!("idsync_jwks_refetch_suppressed_total", "issuer" => issuer.clone())
            .increment(0);
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
                etag: None,
            }),
            last_error: std::sync::Mutex::new(None),
            deferred: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The keys, if there are any and they are not older than the maximum age.
    pub fn usable(&self) -> Result<Arc<KeySet>, KeysUnavailable> {
        let Some(set) = self.current.load_full() else {
            return Err(KeysUnavailable::NotLoaded {
                issuer: self.issuer.clone(),
                last: self.last_error(),
            });
        };
        let age = set.fetched_at.elapsed();
        if age > self.opts.max_stale {
            return Err(KeysUnavailable::TooOld {
                issuer: self.issuer.clone(),
                age_secs: age.as_secs(),
                max_secs: self.opts.max_stale.as_secs(),
                last: self.last_error(),
            });
        }
        Ok(set)
    }

    pub fn last_error(&self) -> Option<FetchError> {
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
            if !self.deferred.swap(true, Ordering::AcqRel) {
                self.wake.notify_one();
            }
            return false;
        }
        self.load(&mut state, trigger).await.is_ok()
    }

    async fn fetch(
        &self,
        state: &mut RefreshState,
        trigger: Trigger,
    ) -> Result<Option<KeySet>, FetchError> {
        let jwks = |uri: Url, etag: Option<String>| async move {
            match self.client.jwks(&uri, etag.as_deref()).await? {
                JwksFetch::NotModified => Ok((None, etag)),
                JwksFetch::Keys { set, etag } => Ok((Some(set), etag)),
            }
        };
        let uri = match &self.source {
            KeySource::File(path) => {
                let shown = path.display().to_string();
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| FetchError::KeyFile {
                        path: shown.clone(),
                        cause: e.to_string(),
                    })?;
                return KeySet::from_file_bytes(&bytes).map(Some).map_err(|e| {
                    FetchError::KeyFile {
                        path: shown,
                        cause: e.to_string(),
                    }
                });
            }
            KeySource::JwksUri(u) => u.clone(),
            KeySource::Discovery => match (&state.jwks_uri, trigger) {
                (Some(uri), Trigger::UnknownKid) => uri.clone(),
                _ => {
                    let uri = self.client.discover(&self.issuer).await?;
                    if state.jwks_uri.as_ref() != Some(&uri) {
                        state.etag = None;
                    }
                    state.jwks_uri = Some(uri.clone());
                    uri
                }
            },
        };
        // Only a load that already holds keys may be answered "not modified".
        let etag = self.current.load().as_ref().and(state.etag.clone());
        let (set, etag) = jwks(uri, etag).await?;
        state.etag = etag;
        Ok(set)
    }

    async fn load(&self, state: &mut RefreshState, trigger: Trigger) -> Result<(), FetchError> {
        if trigger == Trigger::UnknownKid {
            state.last_on_demand = Some(Instant::now());
        }
        let issuer = self.issuer.clone();
        let result = self.fetch(state, trigger).await;
        match result {
            Ok(fetched) => {
                let set = match fetched {
                    Some(set) => set,
                    // 304: the keys we hold are confirmed as of now.
                    None => match self.current.load_full() {
                        Some(old) => old.confirmed_now(),
                        None => {
                            return Err(FetchError::Transport {
                                url: self.issuer.clone(),
                                cause: "the IdP answered 304 Not Modified to a request for keys idsync does not hold".into(),
                            });
                        }
                    },
                };
                let previous = self.current.load_full();
                let changed = previous.as_ref().is_none_or(|old| !old.same_keys(&set));
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
                // For alerting on keys that stopped refreshing: `time() - this` is their age.
                metrics::gauge!("idsync_jwks_last_success_timestamp_seconds", "issuer" => issuer.clone())
                    .set(crate::oidc::unix_now() as f64);
                self.current.store(Some(Arc::new(set)));
                self.generation.fetch_add(1, Ordering::AcqRel);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                metrics::counter!("idsync_jwks_fetch_total", "issuer" => issuer, "outcome" => "ok")
                    .increment(1);
                Ok(())
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
                    *e = Some(error.clone());
                }
                Err(error)
            }
        }
    }

    /// Loads keys once, now (for `idsync check` and `token inspect`); returns why it failed.
    pub async fn load_now(&self) -> Result<Arc<KeySet>, FetchError> {
        let mut state = self.refresh.lock().await;
        self.load(&mut state, Trigger::Startup).await?;
        self.usable().map_err(|_| FetchError::Transport {
            url: self.issuer.clone(),
            cause: "keys loaded but not usable".into(),
        })
    }

    /// The `jwks_uri` discovery found, if discovery ran.
    pub async fn discovered_jwks_uri(&self) -> Option<Url> {
        self.refresh.lock().await.jwks_uri.clone()
    }

    /// The background task: load with backoff until the first success, then refresh on schedule
    /// (retrying sooner while the source fails), and run the refetch deferred by the cooldown as soon as
    /// it ends. Runs until aborted.
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
                self.load(&mut state, trigger).await.is_ok()
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
            let next = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => break,
                    () = self.wake.notified() => self.run_deferred().await,
                }
            }
        }
    }

    /// Waits out the cooldown, then makes the one refetch the suppressed unknown `kid`s asked for.
    async fn run_deferred(&self) {
        let since = self.refresh.lock().await.last_on_demand;
        if let Some(t) = since {
            tokio::time::sleep(self.opts.refetch_cooldown.saturating_sub(t.elapsed())).await;
        }
        if self.deferred.swap(false, Ordering::AcqRel) {
            self.refetch(self.generation(), Trigger::UnknownKid).await;
        }
    }
}
