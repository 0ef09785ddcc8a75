//! What a request carries that the access decision needs: the tenant the client asks for (set aside
//! before the strip) and the one bearer token. HTTP parsing only; the decision is `access`'s.

use super::error::ApiError;
use super::headers::{self, HeaderNames};
use crate::identity::TenantId;
use http::{HeaderMap, header};

/// What the client sent that idsync treats as a request, never as a fact.
#[derive(Debug, Default)]
pub struct ClientAsks {
    pub tenant: Option<TenantId>,
}

/// Takes the client's tenant request aside, then strips every owned header. Must run before anything else.
pub fn take_and_strip(
    headers: &mut HeaderMap,
    names: &HeaderNames,
) -> Result<ClientAsks, ApiError> {
    let mut values = headers.get_all(&names.tenant_id).iter();
    let tenant = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|_| ApiError::InvalidRequest("tenant header is not ASCII text".into()))?
                .trim()
                .to_owned(),
        ),
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "several tenant headers were sent".into(),
            ));
        }
    };
    headers::strip(headers, names);
    let tenant = match tenant.filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(TenantId::parse("tenant header", &t).map_err(|e| {
            ApiError::InvalidRequest(format!("the requested tenant is not a tenant id: {e}"))
        })?),
    };
    Ok(ClientAsks { tenant })
}

/// The bearer token from the one `Authorization` header (RFC 6750 section 2.1; the scheme is
/// case-insensitive per RFC 9110 section 11.1). Tokens in the query string are never read.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(ApiError::InvalidToken("missing bearer token".into())),
        (Some(v), None) => v,
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "several Authorization headers were sent".into(),
            ));
        }
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::InvalidToken("Authorization header is not ASCII".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::InvalidToken("Authorization is not a bearer token".into()))?;
    if !scheme.eq_ignore_ascii_case("Bearer") {
        return Err(ApiError::InvalidToken(
            "Authorization is not a bearer token".into(),
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(ApiError::InvalidToken("missing bearer token".into()));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(&with_auth(&["bearer abc"])).unwrap(), "abc");
        assert_eq!(bearer_token(&with_auth(&["BEARER abc"])).unwrap(), "abc");
    }

    #[test]
    fn missing_basic_or_duplicated_authorization_is_refused() {
        assert!(matches!(
            bearer_token(&with_auth(&[])),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&with_auth(&["Basic dXNlcjpwYXNz"])),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&with_auth(&["Bearer "])),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&with_auth(&["Bearer a", "Bearer b"])),
            Err(ApiError::InvalidRequest(_))
        ));
    }

    #[test]
    fn client_tenant_is_taken_aside_before_the_strip() {
        let names = HeaderNames::new("X-").unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-tenant-id", HeaderValue::from_static(" t-2 "));
        let asks = take_and_strip(&mut h, &names).unwrap();
        assert_eq!(asks.tenant.unwrap().as_str(), "t-2");
        assert!(h.get("x-tenant-id").is_none());
    }
}
