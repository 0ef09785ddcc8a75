//! What happens at the IdP reaching idsync without waiting for the user's next request: OIDC
//! Back-Channel Logout 1.0, Frontegg and Keycloak (keycloak-events) webhooks, and change notices from
//! other replicas. Verification here (the logout token like an access token, the webhooks' shared
//! secrets); the meaning of a payload in `identity::lifecycle`; the writes in `provision`.

use super::{Gatekeeper, Issuer};
use crate::identity::Dialect;
use crate::identity::lifecycle::{self, Event};
use crate::oidc::{KeysUnavailable, VerifyError, numeric_claim, verify_hmac_jwt};
use crate::provision::audit::{self, AuditKind};
use crate::provision::lifecycle::{Applied, Apply};
use crate::provision::notify::{Heard, Notice};
use crate::provision::revocations::{self, Revocation, Revoked, UsedToken};
use crate::provision::{Affected, store};
use chrono::{DateTime, TimeZone, Utc};
use sea_orm::{DbErr, TransactionTrait};
use serde_json::{Value, json};
use std::sync::Arc;

/// The `events` member that makes a JWT a logout token (OIDC Back-Channel Logout 1.0 section 2.4).
const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// How old a Frontegg webhook's signed header may be (its `iat`): the replay window.
const WEBHOOK_MAX_AGE_SECS: i64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// 400: the request or the token is not acceptable; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// 401: no configured secret verifies the webhook; nothing changed.
    #[error("the webhook signature does not verify")]
    BadSignature,
    /// 503: the issuer's keys are unavailable.
    #[error(transparent)]
    Keys(KeysUnavailable),
    /// 503: the database failed; nothing changed (one transaction).
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<store::StoreError> for LifecycleError {
    fn from(e: store::StoreError) -> Self {
        match e {
            store::StoreError::Db(db) => Self::Database(db),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// What a logout did.
#[derive(Debug)]
pub struct LoggedOut {
    pub issuer: crate::identity::SharedStr,
    pub revoked: Revoked,
}

/// What a webhook delivery did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Delivered {
    /// The IdP's event name; `None` when the body carried an event idsync does not handle.
    pub event: Option<String>,
    pub changed: usize,
    pub stale: usize,
    pub skipped: usize,
}

fn at_seconds(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(s, 0).single().unwrap_or_else(Utc::now)
}

impl Gatekeeper {
    /// OIDC Back-Channel Logout 1.0 section 2.6: verifies `token` as the issuer's logout token and
    /// revokes the session (`sid`) or, with only `sub`, every token of the user issued before it.
    pub async fn backchannel_logout(
        &self,
        token: &str,
        now: i64,
    ) -> Result<LoggedOut, LifecycleError> {
        let parsed =
            crate::oidc::ParsedToken::parse(token, self.registry.verify_options().max_token_bytes)
                .map_err(|e| LifecycleError::Invalid(format!("logout token: {e}")))?;
        match self.registry.get(parsed.issuer()) {
            Some(i) if i.logout_audiences.is_empty() => {
                return Err(LifecycleError::Invalid(
                    "back-channel logout is not enabled for this issuer".into(),
                ));
            }
            _ => {}
        }
        let (issuer, verified) =
            self.registry
                .verify_logout(token, now)
                .await
                .map_err(|e| match e {
                    VerifyError::KeysUnavailable(k) => LifecycleError::Keys(k),
                    other => LifecycleError::Invalid(format!("logout token: {other}")),
                })?;
        let claims = &verified.claims;
        let invalid = |m: &str| LifecycleError::Invalid(format!("logout token: {m}"));
        if !claims
            .get("events")
            .and_then(Value::as_object)
            .is_some_and(|e| e.contains_key(LOGOUT_EVENT))
        {
            return Err(invalid("`events` does not name a back-channel logout"));
        }
        if claims.contains_key("nonce") {
            return Err(invalid("a logout token carries no `nonce`"));
        }
        let iat = numeric_claim(claims, "iat")
            .map_err(|e| invalid(&e.to_string()))?
            .ok_or_else(|| invalid("`iat` is missing"))?;
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| invalid("`jti` is missing"))?;
        let sid = claims
            .get("sid")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let sub = match claims.get("sub").and_then(Value::as_str) {
            Some(raw) => Some(
                issuer
                    .rules
                    .subject("sub", raw)
                    .map_err(|e| invalid(&e.to_string()))?,
            ),
            None => None,
        };
        let revoked = match (sid, &sub) {
            (Some(sid), _) => Revoked::Session(sid.to_owned()),
            (None, Some(sub)) => Revoked::User {
                sub: sub.to_string(),
                not_before: iat,
            },
            (None, None) => return Err(invalid("neither `sid` nor `sub` is present")),
        };
        let revocation = Revocation {
            issuer: issuer.name.to_string(),
            revoked: revoked.clone(),
            expires_at: Utc::now() + self.lifecycle.logout_retention,
        };
        let used = UsedToken {
            issuer: &issuer.name,
            jti,
            until: at_seconds(verified.expires_at + self.registry.verify_options().leeway_secs),
        };
        let db = self.provisioner.db();
        if !revocations::record_logout(db, &used, std::slice::from_ref(&revocation)).await? {
            return Err(invalid("this logout token was already used"));
        }
        self.revocations.add(std::slice::from_ref(&revocation));
        let (kind, details) = match &revoked {
            Revoked::Session(sid) => (AuditKind::SessionRevoked, json!({"sid": sid, "jti": jti})),
            Revoked::User { not_before, .. } => (
                AuditKind::UserSessionsRevoked,
                json!({"issued_before": not_before, "jti": jti}),
            ),
        };
        let recorded = audit::record(
            db,
            vec![audit::Event {
                kind,
                issuer: Some(&issuer.name),
                user: sub.as_ref().map(|s| s.as_str()),
                organization: None,
                actor: "backchannel-logout",
                details,
                at: Utc::now(),
            }],
        )
        .await;
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "the logout was applied but could not be audited");
        }
        self.publish(&[Notice::Revocations]).await;
        metrics::counter!("idsync_logouts_total").increment(1);
        Ok(LoggedOut {
            issuer: issuer.name.clone(),
            revoked,
        })
    }

    /// A Frontegg webhook: `x-webhook-secret` is a JWT signed with the secret set in Frontegg's webhook
    /// settings (`webhook-secret-file=`); the issuer is the one whose secret verifies it.
    pub async fn frontegg_webhook(
        &self,
        signed_header: &str,
        body: &[u8],
        now: i64,
    ) -> Result<Delivered, LifecycleError> {
        let leeway = self.registry.verify_options().leeway_secs;
        let (issuer, claims) = self
            .webhook_issuers(Dialect::Frontegg)
            .find_map(|(i, secret)| {
                verify_hmac_jwt(secret, signed_header, now, leeway, WEBHOOK_MAX_AGE_SECS)
                    .ok()
                    .map(|c| (i.clone(), c))
            })
            .ok_or(LifecycleError::BadSignature)?;
        let json: Value = serde_json::from_slice(body)
            .map_err(|e| LifecycleError::Invalid(format!("the body is not JSON: {e}")))?;
        let event = lifecycle::frontegg(&json, &issuer.rules)
            .map_err(|e| LifecycleError::Invalid(e.to_string()))?;
        // Frontegg's payload has no event time; its signed header's `iat` is when it was sent.
        let at = numeric_claim(&claims, "iat")
            .ok()
            .flatten()
            .map_or_else(Utc::now, at_seconds);
        self.deliver(&issuer, "webhook:frontegg", event, at).await
    }

    /// A keycloak-events webhook: `X-Keycloak-Signature` is the hex HMAC-SHA256 of the body with the
    /// webhook's secret (`webhook-secret-file=`).
    pub async fn keycloak_webhook(
        &self,
        signature_hex: &str,
        body: &[u8],
    ) -> Result<Delivered, LifecycleError> {
        let given = hex_decode(signature_hex.trim()).ok_or(LifecycleError::BadSignature)?;
        let issuer = self
            .webhook_issuers(Dialect::Keycloak)
            .find(|(_, secret)| {
                let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
                aws_lc_rs::hmac::verify(&key, body, &given).is_ok()
            })
            .map(|(i, _)| i.clone())
            .ok_or(LifecycleError::BadSignature)?;
        let json: Value = serde_json::from_slice(body)
            .map_err(|e| LifecycleError::Invalid(format!("the body is not JSON: {e}")))?;
        let event = lifecycle::keycloak(&json, &issuer.rules)
            .map_err(|e| LifecycleError::Invalid(e.to_string()))?;
        if let Some(realm) = event.as_ref().and_then(|e| e.realm.as_deref())
            && !issuer
                .name
                .trim_end_matches('/')
                .ends_with(&format!("/realms/{realm}"))
        {
            return Err(LifecycleError::Invalid(format!(
                "the event comes from realm {realm}, not this issuer's"
            )));
        }
        let at = event
            .as_ref()
            .and_then(|e| e.at_ms)
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .unwrap_or_else(Utc::now);
        self.deliver(&issuer, "webhook:keycloak", event, at).await
    }

    fn webhook_issuers(&self, dialect: Dialect) -> impl Iterator<Item = (&Arc<Issuer>, &[u8])> {
        self.registry.iter().filter_map(move |i| {
            (i.rules.dialect == dialect)
                .then_some(())
                .and(i.webhook_secret.as_ref())
                .map(|s| (i, s.expose()))
        })
    }

    /// Applies an event in one transaction, then tells this replica's caches and the others.
    async fn deliver(
        &self,
        issuer: &Issuer,
        actor: &str,
        event: Option<Event>,
        at: DateTime<Utc>,
    ) -> Result<Delivered, LifecycleError> {
        let Some(event) = event else {
            return Ok(Delivered::default());
        };
        let applied = self.apply(issuer, actor, &event, at).await?;
        metrics::counter!("idsync_webhook_events_total", "actor" => actor.to_owned()).increment(1);
        Ok(Delivered {
            event: Some(event.kind),
            changed: applied.changed,
            stale: applied.stale,
            skipped: applied.skipped,
        })
    }

    /// Applies `event` for `issuer` (one transaction), revokes the sessions it ends, and invalidates.
    pub async fn apply(
        &self,
        issuer: &Issuer,
        actor: &str,
        event: &Event,
        at: DateTime<Utc>,
    ) -> Result<Applied, LifecycleError> {
        let roles = &self.policy.roles;
        let role_for = |idp: Option<&[String]>| match idp {
            Some(r) => roles.app_role(r).to_owned(),
            None => roles.default_role().to_owned(),
        };
        let how = Apply {
            issuer: &issuer.name,
            actor,
            cause: &event.kind,
            at,
            tenant_schema: self.lifecycle.tenant_schema.as_deref(),
            role_for: &role_for,
        };
        let db = self.provisioner.db();
        let txn = db.begin_with_options(store::write_transaction()).await?;
        let applied = crate::provision::lifecycle::apply(&txn, &how, &event.changes).await?;
        let ended: Vec<Revocation> = applied
            .ended_sessions
            .iter()
            .map(|(_, sid)| Revocation {
                issuer: issuer.name.to_string(),
                revoked: Revoked::Session(sid.clone()),
                expires_at: Utc::now() + self.lifecycle.logout_retention,
            })
            .collect();
        revocations::record(&txn, &ended, Utc::now()).await?;
        for (user, sid) in &applied.ended_sessions {
            audit::record(
                &txn,
                vec![audit::Event {
                    kind: AuditKind::SessionRevoked,
                    issuer: Some(&issuer.name),
                    user: Some(user),
                    organization: None,
                    actor,
                    details: json!({"sid": sid, "cause": event.kind}),
                    at: Utc::now(),
                }],
            )
            .await?;
        }
        txn.commit().await?;
        if !ended.is_empty() {
            self.revocations.add(&ended);
        }
        self.changed(&applied.affected, !ended.is_empty()).await;
        Ok(applied)
    }

    /// After a change made here: drop what this replica remembers about it and tell the others.
    pub async fn changed(&self, affected: &[Affected], revocations: bool) {
        for a in affected {
            self.forget(a);
        }
        let mut notices: Vec<Notice> = affected.iter().map(Notice::from).collect();
        if revocations {
            notices.push(Notice::Revocations);
        }
        self.publish(&notices).await;
    }

    async fn publish(&self, notices: &[Notice]) {
        if let Err(e) = crate::provision::notify::publish(
            self.provisioner.db(),
            &self.lifecycle.origin,
            notices,
        )
        .await
        {
            tracing::warn!(error = %e, "could not tell other replicas about a change; they catch up within --sync-cache-ttl");
        }
    }

    /// A change made on another replica (or a missed-notices flush).
    pub async fn heard(&self, heard: Heard) {
        match heard {
            Heard::Notice(Notice::User { u }) => self.forget(&Affected::User(u)),
            Heard::Notice(Notice::Organization { t }) => self.forget(&Affected::Organization(t)),
            Heard::Notice(Notice::Membership { u, t }) => self.forget(&Affected::Membership(u, t)),
            Heard::Notice(Notice::Revocations) => self.reload_revocations().await,
            Heard::Missed => {
                self.provisioner.invalidate_all();
                self.reload_revocations().await;
            }
        }
    }

    /// Loads every live revocation from the database.
    pub async fn reload_revocations(&self) {
        match revocations::live(self.provisioner.db(), Utc::now()).await {
            Ok(all) => self.revocations.replace(&all),
            Err(e) => {
                tracing::warn!(error = %e, "could not load revocations; keeping the ones held")
            }
        }
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
