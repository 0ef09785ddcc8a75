//! Many rows in one statement whose text does not depend on how many rows there are. On PostgreSQL a
//! batch's rows travel as one array per column (`INSERT … SELECT … FROM UNNEST($1::text[], …)`, reads as
//! `= ANY($1)`), so group commit's statements are a handful of texts each prepared once per connection,
//! instead of one text per batch size (which filled the driver's statement cache with hundreds of
//! kilobyte-sized statements per connection: about 50 MiB after a burst of new identities, measured in
//! BENCHMARKS.md). Elsewhere (SQLite) the usual multi-row `VALUES`.
//!
//! The SeaORM binder passes array elements as non-null values only, so every value travels as text with,
//! for a nullable column, a parallel `bool[]` saying which are NULL; the statement casts each column back
//! to its type.

use chrono::SecondsFormat;
use sea_orm::sea_query::{ArrayType, OnConflict, PostgresQueryBuilder, QueryBuilder};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, ColumnType, ConnectionTrait, DatabaseBackend,
    DbErr, EntityName, EntityTrait, IdenStatic, Iterable, Statement, Value,
};

type Model<A> = <<A as ActiveModelTrait>::Entity as EntityTrait>::Model;

/// Inserts `rows` (with `on_conflict`, if any) and returns what the statement returned.
pub(super) async fn insert_returning<A>(
    db: &impl ConnectionTrait,
    rows: Vec<A>,
    on_conflict: Option<OnConflict>,
) -> Result<Vec<Model<A>>, DbErr>
where
    A: ActiveModelTrait,
    Model<A>: sea_orm::IntoActiveModel<A>,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if db.get_database_backend() != DatabaseBackend::Postgres {
        let mut insert = A::Entity::insert_many(rows);
        if let Some(c) = on_conflict {
            insert = insert.on_conflict(c);
        }
        return match insert.exec_with_returning(db).await {
            Ok(rows) => Ok(rows),
            // DO NOTHING that did nothing.
            Err(DbErr::RecordNotInserted | DbErr::RecordNotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
    }
    let stmt = unnest_insert(&rows, on_conflict.as_ref(), true)?;
    A::Entity::find().from_raw_sql(stmt).all(db).await
}

/// Inserts `rows`, returning nothing.
pub(super) async fn insert<A: ActiveModelTrait>(
    db: &impl ConnectionTrait,
    rows: Vec<A>,
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return A::Entity::insert_many(rows).exec(db).await.map(|_| ());
    }
    db.execute_raw(unnest_insert(&rows, None, false)?)
        .await
        .map(|_| ())
}

/// The rows of `E` whose `column` is one of `ids`.
pub(super) async fn find_in<E, C>(
    db: &impl ConnectionTrait,
    column: C,
    ids: &[&str],
) -> Result<Vec<E::Model>, DbErr>
where
    E: EntityTrait,
    C: ColumnTrait,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    if db.get_database_backend() != DatabaseBackend::Postgres {
        use sea_orm::QueryFilter;
        return E::find()
            .filter(column.is_in(ids.iter().copied()))
            .all(db)
            .await;
    }
    let sql = format!(
        r#"SELECT * FROM "{}" WHERE "{}" = ANY($1)"#,
        E::default().table_name(),
        column.as_str()
    );
    E::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            sql,
            [text_array(ids.iter().map(|s| (*s).to_owned()))],
        ))
        .all(db)
        .await
}

fn text_array(values: impl Iterator<Item = String>) -> Value {
    Value::Array(
        ArrayType::String,
        Some(Box::new(values.map(|s| Value::String(Some(s))).collect())),
    )
}

/// `INSERT INTO t (c…) SELECT <c cast back> … FROM UNNEST(<one array per column>) … [ON CONFLICT …]
/// [RETURNING *]`: the text depends on the table and the conflict clause only.
fn unnest_insert<A: ActiveModelTrait>(
    rows: &[A],
    on_conflict: Option<&OnConflict>,
    returning: bool,
) -> Result<Statement, DbErr> {
    let table = <A::Entity as Default>::default();
    // Columns the rows leave unset (an auto-increment id) are left to their defaults; which ones is the
    // call site's shape, the same for every row.
    let set = |row: &A, c| !matches!(row.get(c), ActiveValue::NotSet);
    let mut columns = Vec::new();
    for c in <A::Entity as EntityTrait>::Column::iter() {
        let included = set(&rows[0], c);
        if rows.iter().any(|r| set(r, c) != included) {
            return Err(DbErr::Custom(format!(
                "bulk insert: column {} set in some rows only",
                c.as_str()
            )));
        }
        if included {
            columns.push(c);
        }
    }
    let (mut names, mut selects, mut arrays, mut aliases, mut values) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (i, col) in columns.into_iter().enumerate() {
        let def = col.def();
        let ty = sql_type(def.get_column_type()).ok_or_else(|| {
            DbErr::Custom(format!(
                "bulk insert: column {} has a type without a cast",
                col.as_str()
            ))
        })?;
        let mut texts = Vec::with_capacity(rows.len());
        let mut nulls = Vec::with_capacity(rows.len());
        for row in rows {
            let text = match row.get(col) {
                ActiveValue::Set(v) | ActiveValue::Unchanged(v) => as_text(v)?,
                ActiveValue::NotSet => None,
            };
            nulls.push(Value::Bool(Some(text.is_none())));
            texts.push(Value::String(Some(text.unwrap_or_default())));
        }
        names.push(format!(r#""{}""#, col.as_str()));
        arrays.push(format!("${}::text[]", values.len() + 1));
        aliases.push(format!(r#""v{i}""#));
        values.push(Value::Array(ArrayType::String, Some(Box::new(texts))));
        if def.is_null() {
            arrays.push(format!("${}::boolean[]", values.len() + 1));
            aliases.push(format!(r#""n{i}""#));
            values.push(Value::Array(ArrayType::Bool, Some(Box::new(nulls))));
            selects.push(format!(
                r#"CASE WHEN "n{i}" THEN NULL ELSE "v{i}"::{ty} END"#
            ));
        } else if nulls.contains(&Value::Bool(Some(true))) {
            return Err(DbErr::Custom(format!(
                "bulk insert: NULL for the non-null column {}",
                col.as_str()
            )));
        } else {
            selects.push(format!(r#""v{i}"::{ty}"#));
        }
    }
    let mut sql = format!(
        r#"INSERT INTO "{}" ({}) SELECT {} FROM UNNEST({}) AS "r"({})"#,
        table.table_name(),
        names.join(", "),
        selects.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    );
    if let Some(c) = on_conflict {
        PostgresQueryBuilder.prepare_on_conflict(&Some(c.clone()), &mut sql);
    }
    if returning {
        sql.push_str(" RETURNING *");
    }
    Ok(Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        sql,
        values,
    ))
}

fn sql_type(t: &ColumnType) -> Option<&'static str> {
    Some(match t {
        ColumnType::String(_) | ColumnType::Text | ColumnType::Char(_) => "text",
        ColumnType::Boolean => "boolean",
        ColumnType::Json => "json",
        ColumnType::JsonBinary => "jsonb",
        ColumnType::TimestampWithTimeZone => "timestamptz",
        ColumnType::Integer => "integer",
        ColumnType::BigInteger => "bigint",
        _ => return None,
    })
}

/// A value as PostgreSQL reads it back with a cast; `None` for NULL.
fn as_text(v: Value) -> Result<Option<String>, DbErr> {
    Ok(match v {
        Value::String(s) => s,
        Value::Bool(b) => b.map(|b| b.to_string()),
        Value::Int(n) => n.map(|n| n.to_string()),
        Value::BigInt(n) => n.map(|n| n.to_string()),
        Value::Json(j) => j.map(|j| j.to_string()),
        // Microseconds, PostgreSQL's precision, with the offset spelled out: no session time zone applies.
        Value::ChronoDateTimeUtc(t) => t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        other => {
            return Err(DbErr::Custom(format!(
                "bulk insert: no text form for {other:?}"
            )));
        }
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};
    use entity::{audit_events, users};
    use sea_orm::ActiveValue::{NotSet, Set};
    use sea_orm::{Database, DatabaseConnection, TryIntoModel};
    use serde_json::json;

    fn user(i: usize, now: DateTime<Utc>) -> users::ActiveModel {
        users::ActiveModel {
            id: Set(format!("user-{i}")),
            issuer: Set("https://idp.example".into()),
            email: Set(i.is_multiple_of(2).then(|| format!("u{i}@example.com"))),
            email_verified: Set((!i.is_multiple_of(3)).then_some(i.is_multiple_of(2))),
            // Text the array and the cast must carry through unchanged: the empty string is not NULL.
            username: Set(Some(String::new())),
            name: Set(Some(format!(r#"Zoë "{i}", {{a,b}} \ NULL 'x'"#))),
            given_name: Set(None),
            family_name: Set(Some("NULL".into())),
            avatar_url: Set(None),
            idp_roles: Set(json!(["admin", "with \"quote\"", {"nested": [i]}])),
            is_active: Set(true),
            last_login_at: Set(Some(now)),
            lifecycle_at: Set(None),
            deactivated_by: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        }
    }

    fn event(i: usize, now: DateTime<Utc>) -> audit_events::ActiveModel {
        audit_events::ActiveModel {
            id: NotSet,
            occurred_at: Set(now),
            kind: Set("user_created".into()),
            user_id: Set(Some(format!("user-{i}"))),
            organization_id: Set(None),
            issuer: Set(Some("https://idp.example".into())),
            actor: Set("idsync".into()),
            details: Set(json!({"i": i})),
        }
    }

    #[test]
    fn one_statement_text_whatever_the_number_of_rows() {
        let now = Utc::now();
        let one = unnest_insert(&[user(0, now)], None, true).unwrap();
        let many: Vec<_> = (0..37).map(|i| user(i, now)).collect();
        let many = unnest_insert(&many, None, true).unwrap();
        assert_eq!(one.sql, many.sql);
        let (one, many) = (one.values.unwrap().0, many.values.unwrap().0);
        // One text array per column, one null mask per nullable column (users: 16 columns, 10 nullable).
        assert_eq!(one.len(), 26);
        assert_eq!(one.len(), many.len());
        for v in &many {
            let Value::Array(_, Some(items)) = v else {
                panic!("not an array: {v:?}")
            };
            assert_eq!(items.len(), 37);
        }
        // The auto-increment id is left to its default, in the text as well as the values.
        let audit = unnest_insert(&[event(0, now), event(1, now)], None, false).unwrap();
        assert!(!audit.sql.contains(r#""id""#), "{}", audit.sql);
    }

    #[test]
    fn rows_that_disagree_on_what_is_set_are_refused() {
        let now = Utc::now();
        let mut odd = event(1, now);
        odd.id = Set(7);
        assert!(unnest_insert(&[event(0, now), odd], None, false).is_err());
    }

    /// SQLite, and a fresh PostgreSQL database when `IDSYNC_TEST_POSTGRES_URL` is set (with the admin URL
    /// and its name, to drop it), both migrated.
    pub(in crate::provision) async fn databases() -> Vec<(
        DatabaseConnection,
        Option<(String, String)>,
        tempfile::TempDir,
    )> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!("sqlite://{}/bulk.db?mode=rwc", dir.path().display());
        let mut dbs = vec![(Database::connect(&sqlite).await.unwrap(), None, dir)];
        if let Ok(admin) = std::env::var("IDSYNC_TEST_POSTGRES_URL") {
            let name = format!("idsync_bulk_{}", uuid::Uuid::new_v4().simple());
            let conn = Database::connect(&admin).await.unwrap();
            conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            let mut url = url::Url::parse(&admin).unwrap();
            url.set_path(&format!("/{name}"));
            let db = Database::connect(url.as_str()).await.unwrap();
            dbs.push((db, Some((admin, name)), tempfile::tempdir().unwrap()));
        }
        for (db, _, _) in &dbs {
            <migration::Migrator as migration::MigratorTrait>::up(db, None)
                .await
                .unwrap();
        }
        dbs
    }

    /// What goes in as arrays of text comes back as the same row, NULL and empty string apart, to the
    /// microsecond, on SQLite (multi-row `VALUES`) and PostgreSQL (`UNNEST`) alike; the conflict clause
    /// and `RETURNING` work as with `insert_many`.
    #[tokio::test]
    async fn rows_round_trip_unchanged_on_both_databases() {
        let now = Utc.timestamp_micros(1_764_633_600_123_456).unwrap();
        for (db, pg, _dir) in databases().await {
            let rows: Vec<_> = (0..5).map(|i| user(i, now)).collect();
            let mut returned = insert_returning(&db, rows.clone(), None).await.unwrap();
            returned.sort_by(|a, b| a.id.cmp(&b.id));
            let expected: Vec<users::Model> = rows
                .into_iter()
                .map(|r| r.try_into_model().unwrap())
                .collect();
            assert_eq!(
                returned,
                expected,
                "backend {:?}",
                db.get_database_backend()
            );
            let ids = ["user-1", "user-3", "nobody"];
            let mut found = find_in::<users::Entity, _>(&db, users::Column::Id, &ids)
                .await
                .unwrap();
            found.sort_by(|a, b| a.id.cmp(&b.id));
            assert_eq!(found, vec![expected[1].clone(), expected[3].clone()]);
            // Taken ids: DO NOTHING returns nothing, on both.
            let again = insert_returning(
                &db,
                vec![user(0, now)],
                Some(
                    OnConflict::column(users::Column::Id)
                        .do_nothing()
                        .to_owned(),
                ),
            )
            .await
            .unwrap();
            assert!(again.is_empty(), "{again:?}");
            insert(&db, vec![event(0, now), event(1, now)])
                .await
                .unwrap();
            let events = audit_events::Entity::find().all(&db).await.unwrap();
            assert_eq!(events.len(), 2);
            assert_eq!(events[1].details, json!({"i": 1}));
            assert_eq!(events[0].occurred_at, now);
            db.close().await.unwrap();
            if let Some((admin, name)) = pg {
                let conn = Database::connect(&admin).await.unwrap();
                conn.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .unwrap();
            }
        }
    }
}
