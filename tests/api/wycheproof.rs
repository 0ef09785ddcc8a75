//! Project Wycheproof's JWS and JWK vectors through idsync's signature layer (`oidc::verify_signature`,
//! below claim parsing: the vectors' payloads are not claim sets). No `invalid` vector may verify; every
//! `valid` one inside idsync's policy must; what idsync refuses by policy (HMAC, P-521, keys under 2048
//! bits) is counted apart. The counts are printed (`--nocapture`).

use idsync::oidc::{KeySet, verify_signature};
use serde_json::{Value, json};

const SIGNATURES: &str = include_str!("../fixtures/wycheproof/json_web_signature_test.json");
const KEYS: &str = include_str!("../fixtures/wycheproof/json_web_key_test.json");

/// Algorithms idsync verifies (oidc::token::parse_alg).
const POLICY_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "Ed25519",
];

#[derive(Default, Debug)]
struct Tally {
    invalid_rejected: usize,
    valid_accepted: usize,
    valid_refused_by_policy: usize,
    failures: Vec<String>,
}

fn header_alg(jws: &str) -> Option<String> {
    use base64::Engine as _;
    let h = jws.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["alg"].as_str().map(str::to_owned)
}

/// Whether a valid vector is one idsync means to accept: a key idsync loads, an allowed algorithm that
/// the key's own JWK `alg` (when it names one) agrees with (RFC 7517 section 4.4: idsync pins a key to
/// it), and a payload at all (a JWT carries a claim set; an empty one is refused before any crypto).
fn in_policy(jws: &str, keys: &Option<KeySet>, jwks: &Value) -> bool {
    let Some(alg) = header_alg(jws) else {
        return false;
    };
    let pinned_elsewhere = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|k| k["alg"].as_str().is_some_and(|a| a != alg));
    keys.is_some()
        && POLICY_ALGS.contains(&alg.as_str())
        && !pinned_elsewhere
        && jws.split('.').nth(1).is_some_and(|p| !p.is_empty())
}

fn run(file: &str) -> Tally {
    let doc: Value = serde_json::from_str(file).unwrap();
    let mut tally = Tally::default();
    for group in doc["testGroups"].as_array().unwrap() {
        let key = group.get("public").unwrap_or(&group["private"]);
        let jwks = if key.get("keys").is_some() {
            key.clone()
        } else {
            json!({ "keys": [key] })
        };
        // A set idsync will not load (HMAC, weak RSA, enc-only...) verifies nothing.
        let keys = KeySet::from_jwks(&jwks).ok();
        for test in group["tests"].as_array().unwrap() {
            let id = format!("{} tc{}", group["comment"], test["tcId"]);
            let valid = test["result"] == "valid";
            let accepted = match (test["jws"].as_str(), &keys) {
                (Some(jws), Some(k)) => verify_signature(k, jws).is_ok(),
                _ => false,
            };
            let jws = test["jws"].as_str().unwrap_or_default();
            match (valid, accepted) {
                (false, false) => tally.invalid_rejected += 1,
                (false, true) => tally.failures.push(format!(
                    "{id}: invalid vector accepted ({})",
                    test["comment"]
                )),
                (true, true) => tally.valid_accepted += 1,
                (true, false) if !in_policy(jws, &keys, &jwks) => {
                    tally.valid_refused_by_policy += 1
                }
                (true, false) => tally.failures.push(format!(
                    "{id}: valid vector in policy refused ({})",
                    test["comment"]
                )),
            }
        }
    }
    tally
}

#[test]
fn no_invalid_wycheproof_signature_verifies_and_every_valid_one_in_policy_does() {
    let t = run(SIGNATURES);
    println!("json_web_signature_test.json: {t:?}");
    assert!(t.failures.is_empty(), "{:#?}", t.failures);
    assert_eq!(
        t.invalid_rejected + t.valid_accepted + t.valid_refused_by_policy,
        401
    );
    // Pinned, so a policy change shows up here: 46 valid vectors = 26 accepted + 20 refused by policy
    // (HMAC keys, P-521, a header alg other than the key's JWK alg, empty payloads).
    assert_eq!((t.invalid_rejected, t.valid_accepted), (355, 26), "{t:?}");
}

#[test]
fn wycheproof_key_sets_ambiguous_weak_or_not_for_signing_verify_nothing() {
    let t = run(KEYS);
    println!("json_web_key_test.json: {t:?}");
    assert!(t.failures.is_empty(), "{:#?}", t.failures);
    assert_eq!(
        t.invalid_rejected + t.valid_accepted + t.valid_refused_by_policy,
        26
    );
}
