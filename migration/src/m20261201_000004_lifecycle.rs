//! The identity lifecycle: revoked sessions and users (back-channel logout), replayed-logout-token ids,
//! and, per user, organization and membership, the time of the last IdP lifecycle event applied (so a
//! late or replayed webhook never undoes a newer one) and who deactivated it (`idp` or `operator`: the
//! IdP's events and reconcile reactivate only what the IdP deactivated). Organizations and memberships
//! also record their `origin` (`idp`, `idsync` for personal and default organizations, `operator`), so
//! reconcile never deactivates what the IdP never had.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Revocations {
    Table,
    Issuer,
    Kind,
    Value,
    NotBefore,
    ExpiresAt,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
}

#[derive(DeriveIden)]
enum Organizations {
    Table,
}

#[derive(DeriveIden)]
enum Memberships {
    Table,
}

/// The columns users, organizations and memberships gain.
#[derive(DeriveIden)]
enum Added {
    LifecycleAt,
    DeactivatedBy,
    Origin,
}

fn ts<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Revocations::Table)
                    .col(ColumnDef::new(Revocations::Issuer).string().not_null())
                    // `sid` (one session), `sub` (every token of a user issued before not_before),
                    // `jti` (a logout token already used).
                    .col(ColumnDef::new(Revocations::Kind).string().not_null())
                    .col(ColumnDef::new(Revocations::Value).string().not_null())
                    .col(ColumnDef::new(Revocations::NotBefore).big_integer().null())
                    .col(ts(Revocations::ExpiresAt))
                    .col(ts(Revocations::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(Revocations::Issuer)
                            .col(Revocations::Kind)
                            .col(Revocations::Value),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_revocations_expires_at")
                    .table(Revocations::Table)
                    .col(Revocations::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        for table in [
            Users::Table.into_iden(),
            Organizations::Table.into_iden(),
            Memberships::Table.into_iden(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table.clone())
                        .add_column(
                            ColumnDef::new(Added::LifecycleAt)
                                .timestamp_with_time_zone()
                                .null(),
                        )
                        .to_owned(),
                )
                .await?;
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(ColumnDef::new(Added::DeactivatedBy).string().null())
                        .to_owned(),
                )
                .await?;
        }
        for table in [
            Organizations::Table.into_iden(),
            Memberships::Table.into_iden(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(
                            ColumnDef::new(Added::Origin)
                                .string()
                                .not_null()
                                .default("idp"),
                        )
                        .to_owned(),
                )
                .await?;
        }
        // Rows made before this migration: what the audit trail and the naming say about where they
        // came from. Anything else is taken for the IdP's (reconcile --dry-run shows what that means).
        let db = manager.get_connection();
        for sql in [
            "UPDATE organizations SET origin = 'idsync' WHERE id LIKE 'personal-%'",
            "UPDATE organizations SET origin = 'operator' WHERE id IN (SELECT organization_id FROM \
             audit_events WHERE kind = 'organization_created' AND actor <> 'idsync' AND organization_id \
             IS NOT NULL)",
            "UPDATE memberships SET origin = 'idsync' WHERE organization_id LIKE 'personal-%'",
            "UPDATE memberships SET origin = 'operator' WHERE EXISTS (SELECT 1 FROM audit_events a \
             WHERE a.kind = 'membership_created' AND a.actor <> 'idsync' AND a.user_id = \
             memberships.user_id AND a.organization_id = memberships.organization_id)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Organizations::Table.into_iden(),
            Memberships::Table.into_iden(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .drop_column(Added::Origin)
                        .to_owned(),
                )
                .await?;
        }
        for table in [
            Users::Table.into_iden(),
            Organizations::Table.into_iden(),
            Memberships::Table.into_iden(),
        ] {
            for col in [
                Added::LifecycleAt.into_iden(),
                Added::DeactivatedBy.into_iden(),
            ] {
                manager
                    .alter_table(
                        Table::alter()
                            .table(table.clone())
                            .drop_column(col)
                            .to_owned(),
                    )
                    .await?;
            }
        }
        manager
            .drop_table(Table::drop().table(Revocations::Table).to_owned())
            .await
    }
}
