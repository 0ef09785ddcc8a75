//! Frontegg's vendor API: a vendor token (`POST /auth/vendor` with the environment's client id and API
//! key), tenants from `GET /tenants/resources/tenants/v2`, users with their tenants from
//! `GET /identity/resources/users/v3`, both paged by `_limit` and `_offset` (a page index, not an item
//! offset) up to `_metadata.totalPages`.

use super::client::{AdminClient, FetchError, TokenRequest};
use super::{IdpOrganization, IdpUser, Snapshot, scoped_tenant, scoped_user};
use crate::identity::MappingRules;
use crate::identity::lifecycle::Profile;
use serde_json::Value;
use std::sync::atomic::Ordering;

pub struct Frontegg {
    client: AdminClient,
    /// `https://api.frontegg.com` or the region's host.
    api: String,
    rules: MappingRules,
    page: usize,
}

impl Frontegg {
    pub fn new(
        http: reqwest::Client,
        api: &str,
        client_id: &str,
        secret: &str,
        rules: MappingRules,
        page: usize,
    ) -> Self {
        let api = api.trim_end_matches('/').to_owned();
        Self {
            client: AdminClient::new(
                http,
                TokenRequest::FronteggVendor {
                    url: format!("{api}/auth/vendor"),
                    client_id: client_id.to_owned(),
                    secret: secret.to_owned(),
                },
            ),
            api,
            rules,
            page: page.min(200),
        }
    }

    pub fn progress(&self) -> std::sync::Arc<super::Progress> {
        self.client.progress.clone()
    }

    async fn all(&self, path: &str) -> Result<Vec<Value>, FetchError> {
        let mut out = Vec::new();
        let mut page = 0;
        loop {
            let url = format!("{}{path}?_limit={}&_offset={page}", self.api, self.page);
            let body = self
                .client
                .get(&url, &[])
                .await?
                .ok_or_else(|| FetchError::Shape(format!("{path} answered 404")))?;
            let items = body["items"]
                .as_array()
                .ok_or_else(|| FetchError::Shape(format!("{path} has no `items`")))?;
            self.client.progress.pages.fetch_add(1, Ordering::Relaxed);
            let total_pages = body["_metadata"]["totalPages"].as_u64();
            let n = items.len();
            out.extend(items.iter().cloned());
            page += 1;
            let done = match total_pages {
                Some(total) => page as u64 >= total,
                None => n < self.page,
            };
            if done || n == 0 {
                return Ok(out);
            }
        }
    }

    pub async fn snapshot(&self) -> Result<Snapshot, FetchError> {
        let mut snap = Snapshot::default();
        let mut organizations = Vec::new();
        for t in self.all("/tenants/resources/tenants/v2").await? {
            let raw = t["tenantId"]
                .as_str()
                .ok_or_else(|| FetchError::Shape("a tenant has no tenantId".into()))?;
            organizations.push(IdpOrganization {
                id: scoped_tenant(&self.rules, raw)?,
                name: t["name"].as_str().unwrap_or(raw).to_owned(),
                active: t["deletedAt"].is_null(),
            });
            self.client
                .progress
                .organizations
                .fetch_add(1, Ordering::Relaxed);
        }
        for u in self.all("/identity/resources/users/v3").await? {
            let raw = u["id"]
                .as_str()
                .ok_or_else(|| FetchError::Shape("a user has no id".into()))?;
            let id = scoped_user(&self.rules, raw)?;
            let s = |k: &str| u[k].as_str().map(str::to_owned);
            snap.users.push(IdpUser {
                id: id.clone(),
                profile: Profile {
                    email: s("email"),
                    name: s("name"),
                    avatar_url: s("profilePictureUrl"),
                    ..Profile::default()
                },
                active: true,
            });
            self.client.progress.users.fetch_add(1, Ordering::Relaxed);
            // `tenants[]` carries per-tenant state; older answers only `tenantIds`.
            let mut seen = std::collections::HashSet::new();
            for m in u["tenants"].as_array().into_iter().flatten() {
                if let Some(t) = m["tenantId"].as_str() {
                    seen.insert(t.to_owned());
                    let active = !m["isDisabled"].as_bool().unwrap_or(false);
                    snap.memberships
                        .push((id.clone(), scoped_tenant(&self.rules, t)?, active));
                }
            }
            for t in u["tenantIds"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if seen.insert(t.to_owned()) {
                    snap.memberships
                        .push((id.clone(), scoped_tenant(&self.rules, t)?, true));
                }
            }
            self.client
                .progress
                .memberships
                .store(snap.memberships.len(), Ordering::Relaxed);
        }
        snap.organizations = Some(organizations);
        Ok(snap)
    }
}
