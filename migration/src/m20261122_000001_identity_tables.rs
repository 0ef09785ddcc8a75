//! Users, organizations, memberships and audit events, with an index on every foreign key and on email.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Organizations {
    Table,
    Id,
    Issuer,
    Name,
    Slug,
    IsActive,
    Metadata,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Issuer,
    Email,
    EmailVerified,
    Username,
    Name,
    GivenName,
    FamilyName,
    AvatarUrl,
    IdpRoles,
    IsActive,
    LastLoginAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Memberships {
    Table,
    UserId,
    OrganizationId,
    Role,
    IdpRoles,
    IsActive,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    OccurredAt,
    Kind,
    UserId,
    OrganizationId,
    Issuer,
    Actor,
    Details,
}

fn ts(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Organizations::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(Organizations::Id)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(Organizations::Issuer).string().not_null())
                .col(ColumnDef::new(Organizations::Name).string().not_null())
                .col(
                    ColumnDef::new(Organizations::Slug)
                        .string()
                        .not_null()
                        .unique_key(),
                )
                .col(
                    ColumnDef::new(Organizations::IsActive)
                        .boolean()
                        .not_null()
                        .default(true),
                )
                .col(ColumnDef::new(Organizations::Metadata).json_binary().null())
                .col(ts(Organizations::CreatedAt))
                .col(ts(Organizations::UpdatedAt))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Users::Table)
                .if_not_exists()
                .col(ColumnDef::new(Users::Id).string().not_null().primary_key())
                .col(ColumnDef::new(Users::Issuer).string().not_null())
                .col(ColumnDef::new(Users::Email).string().null())
                .col(ColumnDef::new(Users::EmailVerified).boolean().null())
                .col(ColumnDef::new(Users::Username).string().null())
                .col(ColumnDef::new(Users::Name).string().null())
                .col(ColumnDef::new(Users::GivenName).string().null())
                .col(ColumnDef::new(Users::FamilyName).string().null())
                .col(ColumnDef::new(Users::AvatarUrl).string().null())
                .col(ColumnDef::new(Users::IdpRoles).json_binary().not_null())
                .col(
                    ColumnDef::new(Users::IsActive)
                        .boolean()
                        .not_null()
                        .default(true),
                )
                .col(
                    ColumnDef::new(Users::LastLoginAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(ts(Users::CreatedAt))
                .col(ts(Users::UpdatedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_users_email")
                .table(Users::Table)
                .col(Users::Email)
                .if_not_exists()
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Memberships::Table)
                .if_not_exists()
                .col(ColumnDef::new(Memberships::UserId).string().not_null())
                .col(
                    ColumnDef::new(Memberships::OrganizationId)
                        .string()
                        .not_null(),
                )
                .col(ColumnDef::new(Memberships::Role).string().not_null())
                .col(
                    ColumnDef::new(Memberships::IdpRoles)
                        .json_binary()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(Memberships::IsActive)
                        .boolean()
                        .not_null()
                        .default(true),
                )
                .col(ts(Memberships::CreatedAt))
                .col(ts(Memberships::UpdatedAt))
                .primary_key(
                    Index::create()
                        .col(Memberships::UserId)
                        .col(Memberships::OrganizationId),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_memberships_user")
                        .from(Memberships::Table, Memberships::UserId)
                        .to(Users::Table, Users::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_memberships_organization")
                        .from(Memberships::Table, Memberships::OrganizationId)
                        .to(Organizations::Table, Organizations::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        // The primary key (user_id, organization_id) already indexes user_id; organization_id needs its own.
        for (name, col) in [
            ("idx_memberships_user", Memberships::UserId),
            ("idx_memberships_organization", Memberships::OrganizationId),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(Memberships::Table)
                    .col(col)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        }
        m.create_table(
            Table::create()
                .table(AuditEvents::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(AuditEvents::Id)
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ts(AuditEvents::OccurredAt))
                .col(ColumnDef::new(AuditEvents::Kind).string().not_null())
                .col(ColumnDef::new(AuditEvents::UserId).string().null())
                .col(ColumnDef::new(AuditEvents::OrganizationId).string().null())
                .col(ColumnDef::new(AuditEvents::Issuer).string().null())
                .col(ColumnDef::new(AuditEvents::Actor).string().not_null())
                .col(
                    ColumnDef::new(AuditEvents::Details)
                        .json_binary()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        for (name, col) in [
            ("idx_audit_events_user", AuditEvents::UserId),
            ("idx_audit_events_organization", AuditEvents::OrganizationId),
            ("idx_audit_events_occurred_at", AuditEvents::OccurredAt),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(AuditEvents::Table)
                    .col(col)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            AuditEvents::Table.into_iden(),
            Memberships::Table.into_iden(),
            Users::Table.into_iden(),
            Organizations::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
