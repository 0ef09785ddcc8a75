//! Names derived from IdP ids: organization slugs and per-tenant PostgreSQL schema names.

use aws_lc_rs::digest::{Context, SHA256};

const MAX_SLUG: usize = 48;

/// A URL-safe slug from `text`: lowercase ASCII letters and digits, `-` between words.
pub fn slugify(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= MAX_SLUG {
            break;
        }
    }
    out.trim_end_matches('-').to_owned()
}

/// SHA-256 of `parts` separated by NUL (so ("a", "bc") and ("ab", "c") differ), hashed piece by piece
/// without building a joined string: this keys the sync cache on every request.
pub fn digest_parts(parts: &[&str]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            ctx.update(&[0]);
        }
        ctx.update(p.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Short stable hex digest of `parts`, for disambiguation and deterministic ids.
pub fn short_hash(parts: &[&str], hex_len: usize) -> String {
    digest_parts(parts)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..hex_len]
        .to_owned()
}

/// Slug candidates for a new organization: from its name, then the name with a suffix from its id
/// (when another organization already has the plain slug).
pub fn slug_candidates(name: &str, id: &str) -> [String; 2] {
    let base = match slugify(name) {
        s if !s.is_empty() => s,
        _ => match slugify(id) {
            s if !s.is_empty() => s,
            _ => "org".to_owned(),
        },
    };
    let suffixed = format!("{base}-{}", short_hash(&[id], 8));
    [base, suffixed]
}

/// The schema name for a tenant from a template such as `tenant_{slug}` or `t_{id}`: `{slug}` and `{id}`
/// are substituted lowercased, with every character outside `[a-z0-9_]` turned into `_`. Whenever that
/// changed the id (`Acme-1`, `acme_1` and `ACME-1` all normalise to `acme_1`), a short hash of the id is
/// appended, so distinct tenants get distinct names; a name over PostgreSQL's 63 bytes is cut and hashed
/// the same way. The result matches `^[a-z_][a-z0-9_]{0,62}$`, so it can be quoted into DDL safely.
pub fn schema_name(template: &str, slug: &str, id: &str) -> Result<String, String> {
    let (norm_slug, slug_changed) = normalise(slug);
    let (norm_id, id_changed) = normalise(id);
    let mut name = template
        .replace("{slug}", &norm_slug)
        .replace("{id}", &norm_id);
    let lossy = (template.contains("{slug}") && slug_changed && slug.contains('_'))
        || (template.contains("{id}") && id_changed);
    if lossy {
        name = format!("{name}_{}", short_hash(&[id], 8));
    }
    if name.len() > 63 {
        let hash = short_hash(&[&name], 8);
        name.truncate(54);
        name = format!("{name}_{hash}");
    }
    check_schema(&name)?;
    Ok(name)
}

/// The name idsync 0.1 gave a tenant's schema (no hash, `-` to `_`): only for recognising schemas it
/// created before names were recorded.
pub fn legacy_schema_name(template: &str, slug: &str, id: &str) -> Option<String> {
    let name = template
        .replace("{slug}", &slug.replace('-', "_"))
        .replace("{id}", &id.to_ascii_lowercase().replace('-', "_"));
    check_schema(&name).ok().map(|()| name)
}

/// Lowercase ASCII letters, digits and `_`; anything else becomes `_`. Says whether that changed `s`.
/// A slug's `-` to `_` does not count as a change: slugs never contain `_`, so it loses nothing.
fn normalise(s: &str) -> (String, bool) {
    let mut changed = false;
    let out = s
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            '-' => '_',
            _ => {
                changed = true;
                if c.is_ascii_uppercase() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            }
        })
        .collect::<String>();
    (out, changed || s.contains('-'))
}

/// Whether `name` is a schema name idsync could have made (safe to quote into DDL).
pub fn check_schema(name: &str) -> Result<(), String> {
    let valid = name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "schema name `{}` is not ^[a-z_][a-z0-9_]{{0,62}}$",
            name.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_url_safe_and_bounded() {
        assert_eq!(slugify("Acme Corp, Inc."), "acme-corp-inc");
        assert_eq!(slugify("  --Zoë's  Café--"), "zo-s-caf");
        assert_eq!(slugify(&"x".repeat(100)).len(), 48);
        assert_eq!(slug_candidates("李", "38394337-9aff")[0], "38394337-9aff");
        assert_eq!(slug_candidates("", "")[0], "org");
        assert!(slug_candidates("acme", "id-1")[1].starts_with("acme-"));
    }

    #[test]
    fn digest_parts_equals_the_digest_of_the_nul_joined_text() {
        let joined = aws_lc_rs::digest::digest(&SHA256, b"iss\0sub\0tenant");
        assert_eq!(
            digest_parts(&["iss", "sub", "tenant"]).as_slice(),
            joined.as_ref()
        );
        assert_ne!(digest_parts(&["a", "bc"]), digest_parts(&["ab", "c"]));
    }

    #[test]
    fn schema_names_are_validated_so_nothing_can_be_injected() {
        assert_eq!(
            schema_name("tenant_{slug}", "acme-corp", "x").unwrap(),
            "tenant_acme_corp"
        );
        let hostile = schema_name("tenant_{id}", "s", "x\"; DROP SCHEMA public; --").unwrap();
        assert!(
            hostile.starts_with("tenant_x___drop_schema_public____"),
            "{hostile}"
        );
        assert!(
            schema_name("{slug}", "9lives", "x").is_err(),
            "must not start with a digit"
        );
        let long = schema_name("tenant_{slug}", &"a".repeat(80), "x").unwrap();
        assert_eq!(long.len(), 63, "cut and hashed, not refused");
    }

    #[test]
    fn ids_that_normalise_alike_get_distinct_schema_names() {
        let names: Vec<String> = ["Acme-1", "acme_1", "ACME-1", "acme-1"]
            .iter()
            .map(|id| schema_name("t_{id}", "s", id).unwrap())
            .collect();
        assert_eq!(
            names[1], "t_acme_1",
            "an id that needs no change keeps its plain name"
        );
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                assert_ne!(a, b, "{names:?}");
            }
        }
        assert_eq!(
            legacy_schema_name("t_{id}", "s", "Acme-1").as_deref(),
            Some("t_acme_1")
        );
    }
}
