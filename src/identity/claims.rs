//! Typed reads of JSON claims: each helper names the claim in its error, so a bad token gets a precise reason.

use super::{IdentityError, MAX_LIST_ITEMS, MAX_PROFILE_BYTES, Subject, TenantId};
use serde_json::{Map, Value};

/// A claim location: a literal top-level key (URL-style claim names contain dots) or a dotted path into objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimPath(String);

impl ClaimPath {
    pub fn new(path: impl Into<String>) -> Result<Self, String> {
        let path = path.into();
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(format!("claim path `{path}` has an empty segment"));
        }
        Ok(Self(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        if let Some(v) = claims.get(&self.0) {
            return Some(v);
        }
        let mut segments = self.0.split('.');
        let mut current = claims.get(segments.next()?)?;
        for segment in segments {
            current = current.as_object()?.get(segment)?;
        }
        Some(current)
    }
}

pub(super) fn opt_str<'a>(
    claims: &'a Map<String, Value>,
    claim: &str,
) -> Result<Option<&'a str>, IdentityError> {
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IdentityError::invalid(claim, "is not a string")),
    }
}

pub(super) fn opt_profile<T: From<String>>(
    claims: &Map<String, Value>,
    claim: &str,
) -> Result<Option<T>, IdentityError> {
    opt_str(claims, claim)?
        .map(|s| profile_string(claim, s).map(T::from))
        .transpose()
}

/// Profile strings may hold any printable text, but not NUL (PostgreSQL text refuses it) nor unbounded sizes.
pub(super) fn profile_string(claim: &str, s: &str) -> Result<String, IdentityError> {
    if s.len() > MAX_PROFILE_BYTES {
        return Err(IdentityError::invalid(
            claim,
            format!("is longer than {MAX_PROFILE_BYTES} bytes"),
        ));
    }
    if s.contains('\0') {
        return Err(IdentityError::invalid(claim, "contains a NUL character"));
    }
    Ok(s.to_owned())
}

pub(super) fn opt_bool(
    claims: &Map<String, Value>,
    claim: &str,
) -> Result<Option<bool>, IdentityError> {
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        // Some IdPs serialise booleans as strings; accept only the two unambiguous spellings.
        Some(Value::String(s)) if s == "true" => Ok(Some(true)),
        Some(Value::String(s)) if s == "false" => Ok(Some(false)),
        Some(_) => Err(IdentityError::invalid(claim, "is not a boolean")),
    }
}

pub(super) fn opt_subject(
    claims: &Map<String, Value>,
    claim: &str,
) -> Result<Option<Subject>, IdentityError> {
    opt_str(claims, claim)?
        .map(|s| Subject::parse(claim, s))
        .transpose()
}

pub(super) fn opt_tenant(
    claims: &Map<String, Value>,
    claim: &str,
) -> Result<Option<TenantId>, IdentityError> {
    opt_str(claims, claim)?
        .map(|s| TenantId::parse(claim, s))
        .transpose()
}

/// A list claim: a JSON array of strings, or one string split on spaces and commas (`scope`-style).
pub(super) fn string_list(
    value: Option<&Value>,
    claim: &str,
) -> Result<Vec<String>, IdentityError> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| -> Result<(), IdentityError> {
        if s.is_empty() || out.iter().any(|x| x == s) {
            return Ok(());
        }
        if out.len() == MAX_LIST_ITEMS {
            return Err(IdentityError::invalid(
                claim,
                format!("has more than {MAX_LIST_ITEMS} items"),
            ));
        }
        out.push(profile_string(claim, s)?);
        Ok(())
    };
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            for part in s.split([' ', ',']) {
                push(part)?;
            }
        }
        Some(Value::Array(items)) => {
            if items.len() > MAX_LIST_ITEMS {
                return Err(IdentityError::invalid(
                    claim,
                    format!("has more than {MAX_LIST_ITEMS} items"),
                ));
            }
            for item in items {
                match item {
                    Value::String(s) => push(s)?,
                    _ => return Err(IdentityError::invalid(claim, "holds a non-string item")),
                }
            }
        }
        Some(_) => return Err(IdentityError::invalid(claim, "is not a list of strings")),
    }
    Ok(out)
}

/// Tenant ids from a claim that is a string, a number or a list of them (first is the active one).
pub(super) fn tenant_ids(
    value: Option<&Value>,
    claim: &str,
) -> Result<Vec<TenantId>, IdentityError> {
    let one = |v: &Value| -> Result<TenantId, IdentityError> {
        match v {
            Value::String(s) => TenantId::parse(claim, s),
            Value::Number(n) => TenantId::parse(claim, &n.to_string()),
            _ => Err(IdentityError::invalid(claim, "is not a tenant id")),
        }
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            if items.len() > MAX_LIST_ITEMS {
                return Err(IdentityError::invalid(
                    claim,
                    format!("has more than {MAX_LIST_ITEMS} items"),
                ));
            }
            let mut out: Vec<TenantId> = Vec::with_capacity(items.len());
            for item in items {
                let id = one(item)?;
                if !out.contains(&id) {
                    out.push(id);
                }
            }
            Ok(out)
        }
        Some(v) => Ok(vec![one(v)?]),
    }
}

pub(super) fn push_unique(into: &mut Vec<String>, from: Vec<String>) {
    for r in from {
        if !into.contains(&r) {
            into.push(r);
        }
    }
}
