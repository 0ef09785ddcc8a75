//! The trusted issuers: each one a value carrying its name, its claim dialect and mapping rules, and what
//! `oidc` needs to verify its tokens. Built by one constructor, used by `serve`, `check` and `token inspect`,
//! so the three can never disagree about an issuer.

use crate::identity::{ClaimPath, Dialect, MappingRules};
use crate::oidc::{
    IdpClient, IssuerKeys, IssuerTrust, KeyCacheOptions, KeySource, ParsedToken, VerifiedToken,
    VerifyError, VerifyOptions,
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
}

/// A trusted issuer.
pub struct Issuer {
    /// The exact `iss`; every identity of this issuer shares this one copy.
    pub name: Arc<str>,
    pub rules: MappingRules,
    pub trust: IssuerTrust,
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
                let name: Arc<str> = Arc::from(spec.issuer.as_str());
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
                    },
                    trust: IssuerTrust {
                        issuer: name,
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

    /// Verifies `token` against the issuer its `iss` names; a token from any other issuer is refused
    /// without any network call.
    pub async fn verify(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(Arc<Issuer>, VerifiedToken), VerifyError> {
        let parsed = ParsedToken::parse(token, self.verify.max_token_bytes)?;
        let issuer = self
            .get(parsed.issuer())
            .ok_or(VerifyError::UnknownIssuer)?
            .clone();
        let verified = crate::oidc::verify(&issuer.trust, &parsed, now, &self.verify).await?;
        Ok((issuer, verified))
    }
}
