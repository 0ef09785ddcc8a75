//! Keycloak's Admin REST API, as a service-account client sees it (`client_credentials`; realm-management
//! roles `view-users`, and `manage-realm` for organizations on Keycloak 26.0-26.6):
//! `GET /admin/realms/{realm}/users`, `/organizations`, `/organizations/{id}/members`, paged by
//! `first`/`max` until a short page.

use super::client::{AdminClient, FetchError, TokenRequest};
use super::{IdpOrganization, IdpUser, Snapshot, scoped_tenant, scoped_user};
use crate::identity::MappingRules;
use crate::identity::lifecycle::Profile;
use serde_json::Value;
use std::sync::atomic::Ordering;

pub struct Keycloak {
    client: AdminClient,
    /// `{base}/admin/realms/{realm}`.
    admin: String,
    rules: MappingRules,
    page: usize,
}

impl Keycloak {
    /// `issuer` is `{base}/realms/{realm}`; `admin_base` replaces `{base}` for the token and admin calls
    /// (an internal address).
    pub fn new(
        http: reqwest::Client,
        issuer: &str,
        admin_base: Option<&str>,
        client_id: &str,
        secret: &str,
        rules: MappingRules,
        page: usize,
    ) -> Result<Self, FetchError> {
        let trimmed = issuer.trim_end_matches('/');
        let (base, realm) = trimmed
            .rsplit_once("/realms/")
            .ok_or_else(|| FetchError::Shape(format!("{issuer} is not a Keycloak realm URL")))?;
        let base = admin_base.map_or(base, |b| b.trim_end_matches('/'));
        let client = AdminClient::new(
            http,
            TokenRequest::ClientCredentials {
                url: format!("{base}/realms/{realm}/protocol/openid-connect/token"),
                client_id: client_id.to_owned(),
                secret: secret.to_owned(),
            },
        );
        Ok(Self {
            client,
            admin: format!("{base}/admin/realms/{realm}"),
            rules,
            page,
        })
    }

    pub fn progress(&self) -> std::sync::Arc<super::Progress> {
        self.client.progress.clone()
    }

    async fn all(&self, path: &str, extra: &str) -> Result<Option<Vec<Value>>, FetchError> {
        let mut out = Vec::new();
        loop {
            let url = format!(
                "{}/{path}?first={}&max={}{extra}",
                self.admin,
                out.len(),
                self.page
            );
            let Some(page) = self.client.get(&url, &[]).await? else {
                return Ok(None);
            };
            let items = page
                .as_array()
                .ok_or_else(|| FetchError::Shape(format!("{path} is not a list")))?;
            self.client.progress.pages.fetch_add(1, Ordering::Relaxed);
            let n = items.len();
            out.extend(items.iter().cloned());
            if n < self.page {
                return Ok(Some(out));
            }
        }
    }

    fn user(&self, u: &Value) -> Result<IdpUser, FetchError> {
        let raw = u["id"]
            .as_str()
            .ok_or_else(|| FetchError::Shape("a user has no id".into()))?;
        let s = |k: &str| u[k].as_str().map(str::to_owned);
        let (given, family) = (s("firstName"), s("lastName"));
        let name = match (&given, &family) {
            (Some(g), Some(f)) => Some(format!("{g} {f}")),
            (g, f) => g.clone().or(f.clone()),
        };
        Ok(IdpUser {
            id: scoped_user(&self.rules, raw)?,
            profile: Profile {
                email: s("email"),
                username: s("username"),
                name,
                given_name: given,
                family_name: family,
                avatar_url: None,
            },
            active: u["enabled"].as_bool().unwrap_or(true),
        })
    }

    /// Reads everything. A realm without Organizations (404) yields `organizations: None`.
    pub async fn snapshot(&self) -> Result<Snapshot, FetchError> {
        let users = self
            .all("users", "&briefRepresentation=true")
            .await?
            .ok_or_else(|| FetchError::Shape("the users endpoint answered 404".into()))?;
        let mut snap = Snapshot::default();
        for u in &users {
            snap.users.push(self.user(u)?);
            self.client.progress.users.fetch_add(1, Ordering::Relaxed);
        }
        let Some(orgs) = self
            .all("organizations", "&briefRepresentation=true")
            .await?
        else {
            return Ok(snap);
        };
        let mut organizations = Vec::new();
        for o in &orgs {
            let raw = o["id"]
                .as_str()
                .ok_or_else(|| FetchError::Shape("an organization has no id".into()))?;
            let tenant = scoped_tenant(&self.rules, raw)?;
            // idsync names a Keycloak organization by its alias, as the token claim does.
            let name = o["alias"]
                .as_str()
                .or(o["name"].as_str())
                .unwrap_or(raw)
                .to_owned();
            let members = self
                .all(&format!("organizations/{raw}/members"), "")
                .await?
                .ok_or_else(|| {
                    FetchError::Shape(format!("organization {raw} vanished while read"))
                })?;
            for m in &members {
                let user = self.user(m)?;
                snap.memberships.push((user.id, tenant.clone(), true));
                self.client
                    .progress
                    .memberships
                    .fetch_add(1, Ordering::Relaxed);
            }
            organizations.push(IdpOrganization {
                id: tenant,
                name,
                active: o["enabled"].as_bool().unwrap_or(true),
            });
            self.client
                .progress
                .organizations
                .fetch_add(1, Ordering::Relaxed);
        }
        snap.organizations = Some(organizations);
        Ok(snap)
    }

    /// Users idsync holds that the listing did not show: the listing leaves out service accounts, so
    /// each is asked for by id; only a 404 means it is gone.
    pub async fn confirm(&self, ids: &[String]) -> Result<Vec<IdpUser>, FetchError> {
        let mut still = Vec::new();
        for id in ids {
            let raw = match &self.rules.id_prefix {
                Some(p) => id.strip_prefix(&**p).unwrap_or(id),
                None => id,
            };
            if let Some(u) = self
                .client
                .get(&format!("{}/users/{raw}", self.admin), &[])
                .await?
            {
                still.push(self.user(&u)?);
            }
        }
        Ok(still)
    }
}
