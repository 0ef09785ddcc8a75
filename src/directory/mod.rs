//! Operator operations on the synced tables: list, get, create, rename, (de)activate, delete, and the
//! audit trail. Shared by the admin API and the CLI; every change writes an audit event naming the actor.
//! Never sees HTTP.

use crate::identity::{Origin, RoleSource};
use crate::provision::audit::{self, AuditKind, Event};
use crate::provision::lifecycle::BY_OPERATOR;
use crate::provision::store::write_transaction;
use crate::provision::{naming, schemas};
use chrono::{DateTime, Utc};
use entity::{audit_events, memberships, organizations, users};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

pub type Result<T> = std::result::Result<T, DirectoryError>;

/// A page of results; `next_cursor` is passed back as `cursor` for the next page.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

pub const MAX_LIMIT: u64 = 500;

fn page<T, K: ToString>(mut items: Vec<T>, limit: u64, key: impl Fn(&T) -> K) -> Page<T> {
    let next_cursor = if items.len() as u64 > limit {
        items.truncate(limit as usize);
        items.last().map(|i| key(i).to_string())
    } else {
        None
    };
    Page { items, next_cursor }
}

fn clamp(limit: Option<u64>) -> u64 {
    limit.unwrap_or(50).clamp(1, MAX_LIMIT)
}

#[derive(Debug, Default)]
pub struct UserFilter {
    pub email: Option<String>,
    pub organization: Option<String>,
}

#[derive(Debug, Default)]
pub struct AuditFilter {
    pub user: Option<String>,
    pub organization: Option<String>,
    pub kind: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct UserWithMemberships {
    #[serde(flatten)]
    pub user: users::Model,
    pub memberships: Vec<memberships::Model>,
}

#[derive(Debug, Serialize)]
pub struct OrganizationWithCount {
    #[serde(flatten)]
    pub organization: organizations::Model,
    pub member_count: u64,
}

pub struct Directory {
    db: DatabaseConnection,
    /// `--tenant-schema` template, to drop a deleted organization's schema.
    tenant_schema: Option<String>,
}

impl Directory {
    pub fn new(db: DatabaseConnection, tenant_schema: Option<String>) -> Self {
        Self { db, tenant_schema }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    // Organizations

    pub async fn list_organizations(
        &self,
        limit: Option<u64>,
        cursor: Option<&str>,
    ) -> Result<Page<organizations::Model>> {
        let limit = clamp(limit);
        let mut q = organizations::Entity::find()
            .order_by_asc(organizations::Column::Id)
            .limit(limit + 1);
        if let Some(c) = cursor {
            q = q.filter(organizations::Column::Id.gt(c));
        }
        Ok(page(q.all(&self.db).await?, limit, |o| o.id.clone()))
    }

    pub async fn get_organization(&self, id: &str) -> Result<OrganizationWithCount> {
        let organization = organizations::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("organization {id}")))?;
        let member_count = memberships::Entity::find()
            .filter(memberships::Column::OrganizationId.eq(id))
            .count(&self.db)
            .await?;
        Ok(OrganizationWithCount {
            organization,
            member_count,
        })
    }

    /// Creates an organization ahead of its first user. `issuer` is the IdP whose tenant id this is.
    pub async fn create_organization(
        &self,
        actor: &str,
        id: &str,
        name: &str,
        slug: Option<&str>,
        issuer: &str,
    ) -> Result<organizations::Model> {
        if id.is_empty()
            || id.len() > crate::identity::MAX_ID_BYTES
            || id.chars().any(char::is_control)
        {
            return Err(DirectoryError::Invalid(
                "id must be 1-255 characters without control characters".into(),
            ));
        }
        if name.trim().is_empty() {
            return Err(DirectoryError::Invalid("name must not be empty".into()));
        }
        let slug = match slug {
            Some(s) if naming::slugify(s) == s && !s.is_empty() => s.to_owned(),
            Some(s) => {
                return Err(DirectoryError::Invalid(format!(
                    "slug `{s}` is not lowercase letters, digits and single dashes"
                )));
            }
            None => naming::slug_candidates(name, id)[0].clone(),
        };
        let now = Utc::now();
        let txn = self.db.begin_with_options(write_transaction()).await?;
        if organizations::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(DirectoryError::Conflict(format!(
                "organization {id} already exists"
            )));
        }
        if organizations::Entity::find()
            .filter(organizations::Column::Slug.eq(&slug))
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(DirectoryError::Conflict(format!("slug {slug} is taken")));
        }
        // An organization made ahead of its first user gets its schema now, as sync would give it.
        let schema_name = match &self.tenant_schema {
            Some(t) if txn.get_database_backend() == sea_orm::DatabaseBackend::Postgres => Some(
                schemas::name_for(t, &slug, id)
                    .map_err(|e| DirectoryError::Invalid(e.to_string()))?,
            ),
            _ => None,
        };
        if let Some(schema) = &schema_name {
            schemas::create(&txn, schema).await.map_err(|e| match e {
                schemas::SchemaError::Db(db) => DirectoryError::Db(db),
                other => DirectoryError::Conflict(other.to_string()),
            })?;
        }
        let org = organizations::ActiveModel {
            id: Set(id.to_owned()),
            issuer: Set(issuer.to_owned()),
            name: Set(name.to_owned()),
            slug: Set(slug),
            is_active: Set(true),
            metadata: Set(None),
            schema_name: Set(schema_name),
            lifecycle_at: Set(None),
            deactivated_by: Set(None),
            origin: Set(Origin::Operator.as_str().into()),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(&txn)
        .await?;
        self.audit(
            &txn,
            actor,
            AuditKind::OrganizationCreated,
            None,
            Some(id),
            json!({"name": name, "slug": org.slug, "schema": org.schema_name}),
        )
        .await?;
        txn.commit().await?;
        Ok(org)
    }

    pub async fn rename_organization(
        &self,
        actor: &str,
        id: &str,
        name: &str,
    ) -> Result<organizations::Model> {
        if name.trim().is_empty() {
            return Err(DirectoryError::Invalid("name must not be empty".into()));
        }
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let org = organizations::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("organization {id}")))?;
        let from = org.name.clone();
        let mut active = org.into_active_model();
        active.name = Set(name.to_owned());
        active.updated_at = Set(Utc::now());
        let org = active.update(&txn).await?;
        self.audit(
            &txn,
            actor,
            AuditKind::OrganizationRenamed,
            None,
            Some(id),
            json!({"from": from, "to": name}),
        )
        .await?;
        txn.commit().await?;
        Ok(org)
    }

    pub async fn set_organization_active(
        &self,
        actor: &str,
        id: &str,
        active: bool,
    ) -> Result<organizations::Model> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let org = organizations::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("organization {id}")))?;
        let lifecycle_at = org.lifecycle_at;
        let mut model = org.into_active_model();
        model.is_active = Set(active);
        // An operator's deactivation is theirs: the IdP's events do not undo it.
        model.deactivated_by = Set((!active).then(|| BY_OPERATOR.to_owned()));
        // The operator's word is the newest: an IdP event from before it (a late or replayed webhook)
        // no longer applies to this row.
        model.lifecycle_at = Set(Some(after(lifecycle_at)));
        model.updated_at = Set(Utc::now());
        let org = model.update(&txn).await?;
        let kind = if active {
            AuditKind::OrganizationReactivated
        } else {
            AuditKind::OrganizationDeactivated
        };
        self.audit(&txn, actor, kind, None, Some(id), json!({}))
            .await?;
        txn.commit().await?;
        Ok(org)
    }

    /// Deletes an organization; refused while it has members unless `force`, which cascades to its
    /// memberships and drops its tenant schema if one was created.
    pub async fn delete_organization(&self, actor: &str, id: &str, force: bool) -> Result<()> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let org = organizations::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("organization {id}")))?;
        let members = memberships::Entity::find()
            .filter(memberships::Column::OrganizationId.eq(id))
            .count(&txn)
            .await?;
        if members > 0 && !force {
            return Err(DirectoryError::Conflict(format!(
                "organization {id} has {members} member(s); pass force=true to delete it with its memberships"
            )));
        }
        organizations::Entity::delete_by_id(id.to_owned())
            .exec(&txn)
            .await?;
        // Only the schema this organization records: never one recomputed from a name.
        let schema = schemas::drop_recorded(&txn, &org).await?;
        self.audit(
            &txn,
            actor,
            AuditKind::OrganizationDeleted,
            None,
            Some(id),
            json!({"name": org.name, "members_removed": members, "schema_dropped": schema}),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    // Users

    pub async fn list_users(
        &self,
        filter: &UserFilter,
        limit: Option<u64>,
        cursor: Option<&str>,
    ) -> Result<Page<users::Model>> {
        let limit = clamp(limit);
        let mut q = users::Entity::find()
            .order_by_asc(users::Column::Id)
            .limit(limit + 1);
        if let Some(c) = cursor {
            q = q.filter(users::Column::Id.gt(c));
        }
        if let Some(email) = &filter.email {
            q = q.filter(users::Column::Email.eq(email.as_str()));
        }
        if let Some(org) = &filter.organization {
            let ids: Vec<String> = memberships::Entity::find()
                .filter(memberships::Column::OrganizationId.eq(org.as_str()))
                .all(&self.db)
                .await?
                .into_iter()
                .map(|m| m.user_id)
                .collect();
            q = q.filter(users::Column::Id.is_in(ids));
        }
        Ok(page(q.all(&self.db).await?, limit, |u| u.id.clone()))
    }

    pub async fn get_user(&self, id: &str) -> Result<UserWithMemberships> {
        let user = users::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("user {id}")))?;
        let memberships = memberships::Entity::find()
            .filter(memberships::Column::UserId.eq(id))
            .order_by_asc(memberships::Column::OrganizationId)
            .all(&self.db)
            .await?;
        Ok(UserWithMemberships { user, memberships })
    }

    pub async fn set_user_active(
        &self,
        actor: &str,
        id: &str,
        active: bool,
    ) -> Result<users::Model> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let user = users::Entity::find_by_id(id.to_owned())
            .one(&txn)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("user {id}")))?;
        let lifecycle_at = user.lifecycle_at;
        let mut model = user.into_active_model();
        model.is_active = Set(active);
        // An operator's deactivation is theirs: the IdP's events do not undo it.
        model.deactivated_by = Set((!active).then(|| BY_OPERATOR.to_owned()));
        // The operator's word is the newest: an IdP event from before it (a late or replayed webhook)
        // no longer applies to this row.
        model.lifecycle_at = Set(Some(after(lifecycle_at)));
        model.updated_at = Set(Utc::now());
        let user = model.update(&txn).await?;
        let kind = if active {
            AuditKind::UserReactivated
        } else {
            AuditKind::UserDeactivated
        };
        self.audit(&txn, actor, kind, Some(id), None, json!({}))
            .await?;
        txn.commit().await?;
        Ok(user)
    }

    // Memberships

    pub async fn add_membership(
        &self,
        actor: &str,
        user_id: &str,
        org_id: &str,
        role: &str,
    ) -> Result<memberships::Model> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        if users::Entity::find_by_id(user_id.to_owned())
            .one(&txn)
            .await?
            .is_none()
        {
            return Err(DirectoryError::NotFound(format!("user {user_id}")));
        }
        if organizations::Entity::find_by_id(org_id.to_owned())
            .one(&txn)
            .await?
            .is_none()
        {
            return Err(DirectoryError::NotFound(format!("organization {org_id}")));
        }
        if memberships::Entity::find_by_id((user_id.to_owned(), org_id.to_owned()))
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(DirectoryError::Conflict(format!(
                "user {user_id} is already a member of {org_id}"
            )));
        }
        let now = Utc::now();
        let m = memberships::ActiveModel {
            user_id: Set(user_id.to_owned()),
            organization_id: Set(org_id.to_owned()),
            role: Set(role.to_owned()),
            // The operator chose this role: the IdP does not change it until an operator hands it back.
            role_source: Set(RoleSource::Operator.as_str().to_owned()),
            idp_roles: Set(json!([])),
            is_active: Set(true),
            lifecycle_at: Set(None),
            deactivated_by: Set(None),
            origin: Set(Origin::Operator.as_str().into()),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(&txn)
        .await?;
        self.audit(
            &txn,
            actor,
            AuditKind::MembershipCreated,
            Some(user_id),
            Some(org_id),
            json!({"role": role, "role_source": RoleSource::Operator.as_str()}),
        )
        .await?;
        txn.commit().await?;
        Ok(m)
    }

    /// Sets the role as an operator: from now on the IdP's roles do not change it.
    pub async fn set_membership_role(
        &self,
        actor: &str,
        user_id: &str,
        org_id: &str,
        role: &str,
    ) -> Result<memberships::Model> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let m = self.membership(&txn, user_id, org_id).await?;
        let (from, from_source) = (m.role.clone(), m.role_source.clone());
        let mut model = m.into_active_model();
        model.role = Set(role.to_owned());
        model.role_source = Set(RoleSource::Operator.as_str().to_owned());
        model.updated_at = Set(Utc::now());
        let m = model.update(&txn).await?;
        self.audit(
            &txn,
            actor,
            AuditKind::RoleChanged,
            Some(user_id),
            Some(org_id),
            json!({"from": from, "to": role, "role_source": {"from": from_source, "to": RoleSource::Operator.as_str()}}),
        )
        .await?;
        txn.commit().await?;
        Ok(m)
    }

    /// Sets who decides the role. Handing it back to `idp` lets the next token that speaks for the tenant
    /// set it; `operator` freezes the current role.
    pub async fn set_membership_role_source(
        &self,
        actor: &str,
        user_id: &str,
        org_id: &str,
        source: RoleSource,
    ) -> Result<memberships::Model> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let m = self.membership(&txn, user_id, org_id).await?;
        if m.role_source == source.as_str() {
            return Ok(m);
        }
        let from = m.role_source.clone();
        let mut model = m.into_active_model();
        model.role_source = Set(source.as_str().to_owned());
        model.updated_at = Set(Utc::now());
        let m = model.update(&txn).await?;
        self.audit(
            &txn,
            actor,
            AuditKind::RoleSourceChanged,
            Some(user_id),
            Some(org_id),
            json!({"from": from, "to": source.as_str(), "role": m.role}),
        )
        .await?;
        txn.commit().await?;
        Ok(m)
    }

    pub async fn set_membership_active(
        &self,
        actor: &str,
        user_id: &str,
        org_id: &str,
        active: bool,
    ) -> Result<memberships::Model> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let m = self.membership(&txn, user_id, org_id).await?;
        let lifecycle_at = m.lifecycle_at;
        let mut model = m.into_active_model();
        model.is_active = Set(active);
        // An operator's deactivation is theirs: the IdP's events do not undo it.
        model.deactivated_by = Set((!active).then(|| BY_OPERATOR.to_owned()));
        // The operator's word is the newest: an IdP event from before it (a late or replayed webhook)
        // no longer applies to this row.
        model.lifecycle_at = Set(Some(after(lifecycle_at)));
        model.updated_at = Set(Utc::now());
        let m = model.update(&txn).await?;
        let kind = if active {
            AuditKind::MembershipReactivated
        } else {
            AuditKind::MembershipDeactivated
        };
        self.audit(&txn, actor, kind, Some(user_id), Some(org_id), json!({}))
            .await?;
        txn.commit().await?;
        Ok(m)
    }

    pub async fn remove_membership(&self, actor: &str, user_id: &str, org_id: &str) -> Result<()> {
        let txn = self.db.begin_with_options(write_transaction()).await?;
        let m = self.membership(&txn, user_id, org_id).await?;
        memberships::Entity::delete_by_id((user_id.to_owned(), org_id.to_owned()))
            .exec(&txn)
            .await?;
        self.audit(
            &txn,
            actor,
            AuditKind::MembershipRemoved,
            Some(user_id),
            Some(org_id),
            json!({"role": m.role}),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    async fn membership(
        &self,
        txn: &impl ConnectionTrait,
        user_id: &str,
        org_id: &str,
    ) -> Result<memberships::Model> {
        memberships::Entity::find_by_id((user_id.to_owned(), org_id.to_owned()))
            .one(txn)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("membership of {user_id} in {org_id}")))
    }

    /// Organizations a user belongs to (active memberships in active organizations), for `/.idsync/me`.
    pub async fn active_organizations_of(
        &self,
        user_id: &str,
    ) -> Result<Vec<(organizations::Model, memberships::Model)>> {
        let rows = memberships::Entity::find()
            .filter(memberships::Column::UserId.eq(user_id))
            .filter(memberships::Column::IsActive.eq(true))
            .find_also_related(organizations::Entity)
            .order_by_asc(memberships::Column::OrganizationId)
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(m, o)| o.filter(|o| o.is_active).map(|o| (o, m)))
            .collect())
    }

    // Audit

    pub async fn list_audit_events(
        &self,
        filter: &AuditFilter,
        limit: Option<u64>,
        cursor: Option<&str>,
    ) -> Result<Page<audit_events::Model>> {
        let limit = clamp(limit);
        // Newest first; the cursor is the last id seen.
        let mut q = audit_events::Entity::find()
            .order_by_desc(audit_events::Column::Id)
            .limit(limit + 1);
        if let Some(c) = cursor {
            let id: i64 = c
                .parse()
                .map_err(|_| DirectoryError::Invalid("cursor is not valid".into()))?;
            q = q.filter(audit_events::Column::Id.lt(id));
        }
        if let Some(u) = &filter.user {
            q = q.filter(audit_events::Column::UserId.eq(u.as_str()));
        }
        if let Some(o) = &filter.organization {
            q = q.filter(audit_events::Column::OrganizationId.eq(o.as_str()));
        }
        if let Some(k) = &filter.kind {
            q = q.filter(audit_events::Column::Kind.eq(k.as_str()));
        }
        if let Some(s) = filter.since {
            q = q.filter(audit_events::Column::OccurredAt.gte(s));
        }
        if let Some(u) = filter.until {
            q = q.filter(audit_events::Column::OccurredAt.lt(u));
        }
        Ok(page(q.all(&self.db).await?, limit, |e| e.id))
    }

    async fn audit(
        &self,
        txn: &impl ConnectionTrait,
        actor: &str,
        kind: AuditKind,
        user: Option<&str>,
        organization: Option<&str>,
        details: Value,
    ) -> Result<()> {
        audit::record(
            txn,
            vec![Event {
                kind,
                issuer: None,
                user,
                organization,
                actor,
                details,
                at: Utc::now(),
            }],
        )
        .await?;
        Ok(())
    }
}

/// A lifecycle version after `stored`: now, or just past `stored` when an IdP event was dated later (its
/// clock ahead of ours), so that event, delivered again, counts as older.
fn after(stored: Option<chrono::DateTime<Utc>>) -> chrono::DateTime<Utc> {
    let now = Utc::now();
    match stored {
        Some(s) if s >= now => s + chrono::Duration::milliseconds(1),
        _ => now,
    }
}
