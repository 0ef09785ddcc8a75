//! The trusted issuers: each one a value carrying its name, its claim dialect and mapping rules, and what
//! `oidc` needs to verify its tokens. Built by one constructor, used by `serve`, `check` and `token inspect`,
//! so the three can never disagree about an issuer.

use crate::identity::{ClaimPath, Dialect, MappingRules};
use crate::oidc::{
    IdpClient, IssuerKeys, IssuerTrust, KeyCacheOptions, KeySource, ParsedToken, Purpose,
    VerifiedToken, VerifyError, VerifyOptions,
};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// One `--issuer` as configured.
#[derive(Clone, Debug)]
pub struct IssuerSpec {
    /// Matched against `iss` verbatim (the operator's spelling, trailing slash included).
    pub issuer: String,
    pub dialect: Dialect,
    pub audiences: Vec<String>,
    /// Accepted `azp` values (`authorized-party=`).
    pub authorized_parties: Vec<String>,
    /// `typ=`: the JOSE header `typ` every token must carry (e.g. `at+jwt`).
    pub require_typ: Option<String>,
    pub source: KeySource,
    pub tenant_claim: ClaimPath,
    pub roles_claim: ClaimPath,
    /// `id-prefix=`: put before this issuer's user and tenant ids.
    pub id_prefix: Option<String>,
    /// `logout-audience=`: client ids a back-channel logout token may be addressed to; none, no logout.
    pub logout_audiences: Vec<String>,
    /// `webhook-secret-file=`: the shared secret the IdP signs its webhooks with.
    pub webhook_secret: Option<WebhookSecret>,
}

/// A webhook signing secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(REDACTED)")
    }
}

/// A trusted issuer.
pub struct Issuer {
    /// The exact `iss`; every identity of this issuer shares this one copy.
    pub name: crate::identity::SharedStr,
    pub rules: MappingRules,
    pub trust: IssuerTrust,
    pub logout_audiences: Vec<String>,
    pub webhook_secret: Option<WebhookSecret>,
}

impl Issuer {
    pub fn keys(&self) -> &Arc<IssuerKeys> {
        &self.trust.keys
    }
}

pub struct IssuerRegistry {
    issuers: Vec<Arc<Issuer>>,
    verify: VerifyOptions,
}

impl IssuerRegistry {
    /// Builds every issuer from its spec. `keys_from` replaces every issuer's key source (`token inspect
    /// --jwks-file`).
    pub fn new(
        specs: &[IssuerSpec],
        client: &IdpClient,
        key_cache: &KeyCacheOptions,
        verify: VerifyOptions,
        keys_from: Option<&KeySource>,
    ) -> Self {
        let issuers = specs
            .iter()
            .map(|spec| {
                let name = crate::identity::SharedStr::from(spec.issuer.as_str());
                let keys = Arc::new(IssuerKeys::new(
                    spec.issuer.clone(),
                    keys_from.unwrap_or(&spec.source).clone(),
                    client.clone(),
                    key_cache.clone(),
                ));
                Arc::new(Issuer {
                    name: name.clone(),
                    rules: MappingRules {
                        dialect: spec.dialect,
                        tenant_claim: spec.tenant_claim.clone(),
                        roles_claim: spec.roles_claim.clone(),
                        id_prefix: spec.id_prefix.as_deref().map(Into::into),
                    },
                    logout_audiences: spec.logout_audiences.clone(),
                    webhook_secret: spec.webhook_secret.clone(),
                    trust: IssuerTrust {
                        issuer: Arc::from(spec.issuer.as_str()),
                        audiences: spec.audiences.clone(),
                        authorized_parties: spec.authorized_parties.clone(),
                        require_typ: spec.require_typ.clone(),
                        keys,
                    },
                })
            })
            .collect();
        Self { issuers, verify }
    }

    /// Starts every issuer's background key loading and refresh.
    pub fn spawn_key_refresh(&self) -> Vec<JoinHandle<()>> {
        self.issuers
            .iter()
            .map(|i| tokio::spawn(i.keys().clone().run()))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.issuers.iter()
    }

    /// The configured issuer whose name is exactly `iss`.
    pub fn get(&self, iss: &str) -> Option<&Arc<Issuer>> {
        self.issuers.iter().find(|i| &*i.name == iss)
    }

    pub fn verify_options(&self) -> &VerifyOptions {
        &self.verify
    }

    /// Verifies an access token against the issuer its `iss` names; a token from any other issuer is
    /// refused without any network call.
    pub async fn verify(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(Arc<Issuer>, VerifiedToken), VerifyError> {
        let (parsed, issuer) = self.route(token)?;
        let verified =
            crate::oidc::verify(&issuer.trust, &parsed, now, &self.verify, Purpose::Access).await?;
        Ok((issuer, verified))
    }

    /// Verifies a back-channel logout token the same way (same routing, keys and algorithms), addressed
    /// to one of the issuer's `logout-audience` client ids.
    pub async fn verify_logout(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(Arc<Issuer>, VerifiedToken), VerifyError> {
        let (parsed, issuer) = self.route(token)?;
        let purpose = Purpose::Logout {
            audiences: &issuer.logout_audiences,
        };
        let verified =
            crate::oidc::verify(&issuer.trust, &parsed, now, &self.verify, purpose).await?;
        Ok((issuer, verified))
    }

    /// Parses the token's header and `iss` and picks the configured issuer it names (no network).
    fn route<'t>(&self, token: &'t str) -> Result<(ParsedToken<'t>, Arc<Issuer>), VerifyError> {
        let parsed = ParsedToken::parse(token, self.verify.max_token_bytes)?;
        let issuer = self
            .get(parsed.issuer())
            .ok_or(VerifyError::UnknownIssuer)?
            .clone();
        Ok((parsed, issuer))
    }
}
