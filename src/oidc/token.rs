//! Compact JWS parsing (RFC 7515 section 7.1) before any trust: size, shape, header, algorithm policy.
//! Nothing here verifies a signature; it only refuses what must never reach the crypto.

use super::VerifyError;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

/// The JOSE header fields idsync reads. `jku`, `x5u`, `x5c` and `jwk` are deliberately not read:
/// keys come only from the configured issuer, never from the token (no SSRF, no attacker keys).
#[derive(Debug, Deserialize)]
struct RawHeader {
    alg: serde_json::Value,
    #[serde(default)]
    kid: Option<serde_json::Value>,
    #[serde(default)]
    typ: Option<serde_json::Value>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Debug)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// `typ` without an `application/` prefix, as given (`JWT` or `at+jwt`, any case).
    pub typ: Option<String>,
}

/// A token split into its parts; `payload` is decoded bytes, not yet parsed.
#[derive(Debug)]
pub struct Parts<'a> {
    pub header: Header,
    pub signing_input: &'a str,
    pub signature: &'a str,
    pub payload: Vec<u8>,
}

/// Longest `kid` idsync will look up; real ones are a few dozen bytes.
const MAX_KID_BYTES: usize = 256;

pub fn split(token: &str, max_bytes: usize) -> Result<Parts<'_>, VerifyError> {
    if token.len() > max_bytes {
        return Err(VerifyError::Malformed(format!(
            "token is larger than {max_bytes} bytes"
        )));
    }
    let segments: Vec<&str> = token.split('.').collect();
    match segments.len() {
        3 => {}
        5 => {
            return Err(VerifyError::Malformed(
                "encrypted tokens (JWE) are not supported".into(),
            ));
        }
        n => {
            return Err(VerifyError::Malformed(format!(
                "token has {n} segments, a signed JWT has 3"
            )));
        }
    }
    if segments[0].is_empty() || segments[1].is_empty() {
        return Err(VerifyError::Malformed("token has an empty segment".into()));
    }
    // The header is judged before the signature's presence, so `alg: none` gets its own clear refusal.
    let header_bytes = b64(segments[0], "header")?;
    let header = parse_header(&header_bytes)?;
    if segments[2].is_empty() {
        return Err(VerifyError::Malformed("token has no signature".into()));
    }
    let payload = b64(segments[1], "payload")?;
    let signing_input = &token[..segments[0].len() + 1 + segments[1].len()];
    Ok(Parts {
        header,
        signing_input,
        signature: segments[2],
        payload,
    })
}

fn b64(segment: &str, what: &str) -> Result<Vec<u8>, VerifyError> {
    // RFC 7515 section 2: base64url without padding; `+`, `/` and `=` are not part of it.
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| VerifyError::Malformed(format!("{what} is not base64url")))
}

fn parse_header(bytes: &[u8]) -> Result<Header, VerifyError> {
    let raw: RawHeader = serde_json::from_slice(bytes)
        .map_err(|e| VerifyError::Malformed(format!("header is not a JWS header: {e}")))?;
    let alg = match &raw.alg {
        serde_json::Value::String(s) => parse_alg(s)?,
        _ => {
            return Err(VerifyError::Malformed(
                "header `alg` is not a string".into(),
            ));
        }
    };
    if raw.crit.is_some() {
        // RFC 7515 section 4.1.11: a recipient must reject extensions it does not understand; idsync understands none.
        return Err(VerifyError::Malformed(
            "header `crit` names extensions idsync does not support".into(),
        ));
    }
    let typ = match raw.typ {
        None => None,
        Some(typ) => {
            let t = typ
                .as_str()
                .map(|t| t.strip_prefix("application/").unwrap_or(t))
                .filter(|t| {
                    ["JWT", "at+jwt", "logout+jwt"]
                        .iter()
                        .any(|k| t.eq_ignore_ascii_case(k))
                })
                .ok_or_else(|| {
                    VerifyError::Malformed(
                        "header `typ` is none of `JWT`, `at+jwt`, `logout+jwt`".into(),
                    )
                })?;
            Some(t.to_owned())
        }
    };
    let kid = match raw.kid {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(k)) if k.len() <= MAX_KID_BYTES => Some(k),
        Some(serde_json::Value::String(_)) => {
            return Err(VerifyError::Malformed("header `kid` is too long".into()));
        }
        Some(_) => {
            return Err(VerifyError::Malformed(
                "header `kid` is not a string".into(),
            ));
        }
    };
    Ok(Header { alg, kid, typ })
}

/// The asymmetric algorithms idsync verifies. `none` and HMAC are refused by name: an HMAC "signature"
/// checked against a public key would let anyone who has the public key forge tokens.
fn parse_alg(alg: &str) -> Result<Algorithm, VerifyError> {
    Ok(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        // RFC 9864 names the Ed25519 instance of EdDSA `Ed25519`; keys pin it to Ed25519 keys either way.
        "EdDSA" | "Ed25519" => Algorithm::EdDSA,
        a if a.eq_ignore_ascii_case("none") => {
            return Err(VerifyError::Algorithm(
                "unsigned tokens (alg `none`) are refused".into(),
            ));
        }
        a if a.to_ascii_uppercase().starts_with("HS") => {
            return Err(VerifyError::Algorithm(format!(
                "`{a}` is a shared-secret algorithm; idsync verifies only public-key signatures \
                 (for Frontegg, set the token signing algorithm to RS256)"
            )));
        }
        other => {
            return Err(VerifyError::Algorithm(format!(
                "algorithm `{}` is not allowed",
                other.escape_debug().take(32).collect::<String>()
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(header: &str, payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn well_formed_token_splits_into_header_payload_and_signature() {
        let t = tok(
            r#"{"alg":"RS256","kid":"k1","typ":"at+jwt"}"#,
            r#"{"iss":"x"}"#,
        );
        let p = split(&t, 16 * 1024).unwrap();
        assert_eq!(p.header.alg, Algorithm::RS256);
        assert_eq!(p.header.kid.as_deref(), Some("k1"));
        assert_eq!(p.payload, br#"{"iss":"x"}"#);
        assert_eq!(p.signature, "c2ln");
        assert_eq!(format!("{}.c2ln", p.signing_input), t);
    }

    #[test]
    fn alg_none_in_any_case_is_refused() {
        for alg in ["none", "None", "NONE", "nOnE"] {
            let t = tok(&format!(r#"{{"alg":"{alg}"}}"#), "{}");
            assert!(
                matches!(split(&t, 99999), Err(VerifyError::Algorithm(_))),
                "{alg}"
            );
        }
    }

    #[test]
    fn hmac_algorithms_are_refused_with_a_frontegg_hint() {
        for alg in ["HS256", "HS384", "HS512", "hs256"] {
            let t = tok(&format!(r#"{{"alg":"{alg}"}}"#), "{}");
            match split(&t, 99999) {
                Err(VerifyError::Algorithm(m)) => assert!(m.contains("RS256"), "{m}"),
                other => panic!("{alg}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_segment_counts_and_jwe_are_refused() {
        assert!(
            matches!(split("a.b", 99), Err(VerifyError::Malformed(m)) if m.contains("2 segments"))
        );
        assert!(
            matches!(split("a.b.c.d", 99), Err(VerifyError::Malformed(m)) if m.contains("4 segments"))
        );
        assert!(
            matches!(split("a.b.c.d.e", 99), Err(VerifyError::Malformed(m)) if m.contains("JWE"))
        );
        assert!(matches!(split("a..c", 99), Err(VerifyError::Malformed(m)) if m.contains("empty")));
        let unsigned = tok(r#"{"alg":"RS256"}"#, "{}").replace(".c2ln", ".");
        assert!(
            matches!(split(&unsigned, 999), Err(VerifyError::Malformed(m)) if m.contains("no signature"))
        );
    }

    #[test]
    fn padded_or_standard_base64_is_refused() {
        let good = tok(r#"{"alg":"RS256"}"#, r#"{"a":1}"#);
        let (h, rest) = good.split_once('.').unwrap();
        assert!(split(&format!("{h}=.{rest}"), 999).is_err());
        assert!(split(&format!("{h}+/.{rest}"), 999).is_err());
    }

    #[test]
    fn oversized_token_is_refused_before_decoding() {
        let t = tok(r#"{"alg":"RS256"}"#, &"x".repeat(100));
        assert!(
            matches!(split(&t, 50), Err(VerifyError::Malformed(m)) if m.contains("larger than 50"))
        );
    }

    #[test]
    fn crit_and_unexpected_typ_are_refused() {
        assert!(split(&tok(r#"{"alg":"RS256","crit":["b64"]}"#, "{}"), 999).is_err());
        assert!(split(&tok(r#"{"alg":"RS256","typ":"JWE"}"#, "{}"), 999).is_err());
        assert!(
            split(
                &tok(r#"{"alg":"RS256","typ":"application/at+jwt"}"#, "{}"),
                999
            )
            .is_ok()
        );
    }

    #[test]
    fn key_url_headers_are_ignored_not_followed() {
        let t = tok(
            r#"{"alg":"RS256","kid":"k","jku":"http://evil/jwks","x5u":"http://evil/x5u","jwk":{"kty":"RSA"}}"#,
            "{}",
        );
        let p = split(&t, 9999).unwrap();
        assert_eq!(p.header.kid.as_deref(), Some("k"));
    }

    #[test]
    fn duplicate_header_fields_are_refused() {
        assert!(split(&tok(r#"{"alg":"RS256","alg":"none"}"#, "{}"), 999).is_err());
    }
}
