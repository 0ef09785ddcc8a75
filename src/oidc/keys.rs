//! Verification key sets built from a JWKS document or a PEM file, with each key pinned to the algorithms
//! its type allows. Built once per fetch, never per request.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::Arc;
use std::time::Instant;

const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
/// RSA moduli under 2048 bits are refused (NIST SP 800-131A); base64url of 256 bytes is 342 chars.
const MIN_RSA_MODULUS_B64: usize = 342;

pub struct VerificationKey {
    pub kid: Option<Arc<str>>,
    pub algorithms: &'static [Algorithm],
    pub key: DecodingKey,
    /// The key parsed once for each of its algorithms (jsonwebtoken parses it on every call: for P-256
    /// that is point decoding and validation per request).
    pub prepared: Prepared,
    /// Which key material this is, whatever its `kid`: a cached verification stays valid only while the
    /// issuer still publishes this very key (a reused `kid` or a swapped PEM file is another key).
    pub fingerprint: KeyFingerprint,
}

/// A key's public material in the form aws-lc-rs parses (PKCS#1 `RSAPublicKey` DER, an uncompressed EC
/// point, a raw Ed25519 key), and the parsed key per algorithm, made on first use.
#[derive(Default)]
pub struct Prepared {
    material: Option<Box<[u8]>>,
    parsed: [std::sync::OnceLock<Option<aws_lc_rs::signature::ParsedPublicKey>>; 6],
}

impl Prepared {
    fn new(material: Vec<u8>) -> Self {
        Self {
            material: Some(material.into_boxed_slice()),
            parsed: Default::default(),
        }
    }
}

fn aws_algorithm(
    alg: Algorithm,
) -> Option<&'static dyn aws_lc_rs::signature::VerificationAlgorithm> {
    use aws_lc_rs::signature as s;
    Some(match alg {
        Algorithm::RS256 => &s::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &s::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &s::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &s::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &s::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &s::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &s::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &s::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &s::ED25519,
        _ => return None,
    })
}

impl VerificationKey {
    /// Whether `signature` over `message` holds under `alg` (one of this key's algorithms): with the
    /// prepared key when there is one, else through jsonwebtoken (PEM keys).
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &str) -> bool {
        let slot = self
            .algorithms
            .iter()
            .position(|a| *a == alg)
            .and_then(|i| self.prepared.parsed.get(i));
        let parsed = match (slot, &self.prepared.material, aws_algorithm(alg)) {
            (Some(slot), Some(material), Some(algorithm)) => slot
                .get_or_init(|| {
                    aws_lc_rs::signature::ParsedPublicKey::new(algorithm, material.as_ref()).ok()
                })
                .as_ref(),
            _ => None,
        };
        match parsed {
            Some(key) => {
                let Ok(sig) = base64::Engine::decode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    signature,
                ) else {
                    return false;
                };
                key.verify_sig(message, &sig).is_ok()
            }
            None => {
                jsonwebtoken::crypto::verify(signature, message, &self.key, alg).unwrap_or(false)
            }
        }
    }
}

fn der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

fn der_integer(out: &mut Vec<u8>, be: &[u8]) {
    let digits: &[u8] = match be.iter().position(|b| *b != 0) {
        Some(i) => &be[i..],
        None => &[0],
    };
    let pad = digits[0] & 0x80 != 0;
    out.push(0x02);
    der_length(out, digits.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    der_integer(&mut body, n);
    der_integer(&mut body, e);
    let mut out = vec![0x30];
    der_length(&mut out, body.len());
    out.extend(body);
    out
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s).ok()
}

/// The first 64 bits of a SHA-256 over a key's public parameters. It only tells apart the few keys an
/// issuer publishes over time (a cached token names the one that verified it), and no one chooses the
/// keys an IdP publishes, so two match by chance only (1 in 2^64); 8 bytes in every cached token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyFingerprint([u8; 8]);

impl KeyFingerprint {
    fn of(parts: &[&[u8]]) -> Self {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for p in parts {
            // Length-prefixed, so (ab, c) and (a, bc) differ.
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let mut out = [0u8; 8];
        out.copy_from_slice(&ctx.finish().as_ref()[..8]);
        Self(out)
    }
}

/// Why a document yields no key set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    #[error("not a JWKS document: {0}")]
    NotAJwks(String),
    #[error("no usable signature keys (skipped: {})", if .skipped.is_empty() { "none".to_owned() } else { .skipped.join("; ") })]
    NoUsableKeys { skipped: Vec<String> },
    #[error("{0}")]
    Pem(String),
}

/// One issuer's keys as of one fetch.
pub struct KeySet {
    /// Shared between a set and its re-confirmed copies (a 304 answer keeps the same keys).
    pub keys: Arc<[VerificationKey]>,
    /// When these keys were last confirmed by the source (a refetch that returns the same keys counts).
    pub fetched_at: Instant,
    /// Keys that were present in the document but unusable, with why; for logs and `check`.
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document, keeping every signature key idsync can use and noting the rest.
    pub fn from_jwks(doc: &serde_json::Value) -> Result<Self, KeySetError> {
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| KeySetError::NotAJwks("no `keys` array".into()))?;
        let mut usable = Vec::new();
        let mut skipped = Vec::new();
        for raw in keys {
            let kid = raw
                .get("kid")
                .and_then(|k| k.as_str())
                .unwrap_or("<no kid>");
            match serde_json::from_value::<Jwk>(fully_specified_alg(raw))
                .map_err(|e| e.to_string())
                .and_then(|jwk| verification_key(&jwk))
            {
                Ok(key) => usable.push(key),
                Err(why) => skipped.push(format!("{kid}: {why}")),
            }
        }
        if usable.is_empty() {
            return Err(KeySetError::NoUsableKeys { skipped });
        }
        Ok(KeySet {
            keys: usable.into(),
            fetched_at: Instant::now(),
            skipped,
        })
    }

    /// Parses a PEM public key (RSA, EC P-256/P-384 or Ed25519). It has no `kid`, so it matches any token.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeySetError> {
        let text = std::str::from_utf8(pem)
            .map_err(|_| KeySetError::Pem("PEM file is not text".into()))?;
        let mut keys = Vec::new();
        for block in pem_blocks(text) {
            let fingerprint = KeyFingerprint::of(&[block.as_bytes()]);
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(block.as_bytes()) {
                VerificationKey {
                    kid: None,
                    algorithms: RSA,
                    key: k,
                    prepared: Prepared::default(),
                    fingerprint,
                }
            } else if let Ok(k) = DecodingKey::from_ec_pem(block.as_bytes()) {
                // A PEM does not say its curve cheaply; allow both ES algorithms, the curve check in
                // the crypto refuses a mismatch.
                VerificationKey {
                    kid: None,
                    algorithms: &[Algorithm::ES256, Algorithm::ES384],
                    key: k,
                    prepared: Prepared::default(),
                    fingerprint,
                }
            } else if let Ok(k) = DecodingKey::from_ed_pem(block.as_bytes()) {
                VerificationKey {
                    kid: None,
                    algorithms: &[Algorithm::EdDSA],
                    key: k,
                    prepared: Prepared::default(),
                    fingerprint,
                }
            } else {
                return Err(KeySetError::Pem(
                    "PEM block is not an RSA, EC or Ed25519 public key".into(),
                ));
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeySetError::Pem("PEM file holds no public key".into()));
        }
        Ok(KeySet {
            keys: keys.into(),
            fetched_at: Instant::now(),
            skipped: Vec::new(),
        })
    }

    /// The same keys, confirmed by the source as of now.
    pub fn confirmed_now(&self) -> Self {
        KeySet {
            keys: self.keys.clone(),
            fetched_at: Instant::now(),
            skipped: self.skipped.clone(),
        }
    }

    /// Parses a key file: PEM if it looks like one, else a JWKS document.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, KeySetError> {
        if bytes.windows(10).any(|w| w == b"-----BEGIN") {
            Self::from_pem(bytes)
        } else {
            let doc: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| KeySetError::NotAJwks(format!("neither PEM nor JSON: {e}")))?;
            Self::from_jwks(&doc)
        }
    }

    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().filter_map(|k| k.kid.as_deref()).collect()
    }

    /// Whether this very key (by material, not by `kid`) is in the set.
    pub fn has_fingerprint(&self, fingerprint: KeyFingerprint) -> bool {
        self.keys.iter().any(|k| k.fingerprint == fingerprint)
    }

    pub fn has_kid(&self, kid: Option<&str>) -> bool {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .any(|k| k.kid.as_deref() == Some(kid) || k.kid.is_none()),
            None => true,
        }
    }

    /// Keys that may verify a token with this `kid` and `alg`. A token `kid` matches keys with that kid,
    /// and kid-less keys (PEM); a token without `kid` is tried against every key.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a VerificationKey> + 'a {
        self.keys.iter().filter(move |k| {
            let kid_ok = match (kid, k.kid.as_deref()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            };
            kid_ok && k.algorithms.contains(&alg)
        })
    }

    /// Whether both sets hold the same key material (for logging a change only when keys really change).
    pub fn same_keys(&self, other: &KeySet) -> bool {
        self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .all(|k| other.has_fingerprint(k.fingerprint))
    }
}

/// RFC 9864's `Ed25519` is EdDSA over Ed25519, which is what idsync's EdDSA means; jsonwebtoken knows
/// only the older name.
fn fully_specified_alg(raw: &serde_json::Value) -> serde_json::Value {
    let mut jwk = raw.clone();
    if jwk.get("alg").and_then(|a| a.as_str()) == Some("Ed25519") {
        jwk["alg"] = serde_json::json!("EdDSA");
    }
    jwk
}

fn verification_key(jwk: &Jwk) -> Result<VerificationKey, String> {
    if let Some(PublicKeyUse::Encryption) = jwk.common.public_key_use {
        return Err("encryption key (`use: enc`)".into());
    }
    // RFC 7517 section 4.3: a key whose `key_ops` are given may be used for those operations only.
    if let Some(ops) = &jwk.common.key_operations
        && !ops.iter().any(|o| matches!(o, KeyOperations::Verify))
    {
        return Err("`key_ops` does not include `verify`".into());
    }
    let (family, fingerprint): (&'static [Algorithm], _) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            if p.n.len() < MIN_RSA_MODULUS_B64 {
                return Err("RSA key shorter than 2048 bits".into());
            }
            let modulus =
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &p.n)
                    .map_err(|_| "RSA modulus is not base64url".to_string())?;
            if has_roca_fingerprint(&modulus) {
                return Err("RSA key has the ROCA weakness (CVE-2017-15361): its private key can be computed".into());
            }
            (
                RSA,
                KeyFingerprint::of(&[b"RSA", p.n.as_bytes(), p.e.as_bytes()]),
            )
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let fp = KeyFingerprint::of(&[b"EC", p.x.as_bytes(), p.y.as_bytes()]);
            match p.curve {
                EllipticCurve::P256 => (&[Algorithm::ES256][..], fp),
                EllipticCurve::P384 => (&[Algorithm::ES384][..], fp),
                ref c => return Err(format!("unsupported curve {c:?}")),
            }
        }
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (
                &[Algorithm::EdDSA][..],
                KeyFingerprint::of(&[b"OKP", p.x.as_bytes()]),
            ),
            ref c => return Err(format!("unsupported curve {c:?}")),
        },
        AlgorithmParameters::OctetKey(_) => return Err("symmetric key (`kty: oct`)".into()),
        _ => return Err("unsupported key type".into()),
    };
    // A key that names its algorithm is pinned to exactly that one (RFC 7517 section 4.4).
    let algorithms = match jwk.common.key_algorithm {
        None => family,
        Some(ka) => {
            let named = serde_json::to_value(ka).ok();
            let alg = named
                .as_ref()
                .and_then(|v| v.as_str())
                .and_then(signature_algorithm)
                .ok_or_else(|| format!("algorithm {ka:?} is not a signature algorithm"))?;
            let pos = family
                .iter()
                .position(|a| *a == alg)
                .ok_or_else(|| format!("algorithm {alg:?} does not fit the key type"))?;
            &family[pos..=pos]
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key material: {e}"))?;
    let material = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => b64url(&p.n)
            .zip(b64url(&p.e))
            .map(|(n, e)| rsa_public_key_der(&n, &e)),
        AlgorithmParameters::EllipticCurve(p) => {
            let size = if p.curve == EllipticCurve::P384 {
                48
            } else {
                32
            };
            b64url(&p.x).zip(b64url(&p.y)).and_then(|(x, y)| {
                // X9.62 uncompressed point; coordinates of the wrong size are left to jsonwebtoken.
                (x.len() == size && y.len() == size).then(|| [&[4u8][..], &x, &y].concat())
            })
        }
        AlgorithmParameters::OctetKeyPair(p) => b64url(&p.x),
        _ => None,
    };
    Ok(VerificationKey {
        kid: jwk.common.key_id.as_deref().map(Arc::from),
        algorithms,
        key,
        prepared: material.map(Prepared::new).unwrap_or_default(),
        fingerprint,
    })
}

/// The small primes of the ROCA test (Nemec et al., CCS 2017).
const ROCA_PRIMES: &[u32] = &[
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
    101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
];

/// Whether an RSA modulus has the structure of the Infineon RSALib keys broken by ROCA
/// (CVE-2017-15361): such moduli are, modulo every small prime p, in the subgroup generated by 65537.
/// A random modulus passes every test only with probability below 2^-150.
pub fn has_roca_fingerprint(modulus_be: &[u8]) -> bool {
    ROCA_PRIMES.iter().all(|&p| {
        let residue = modulus_be
            .iter()
            .fold(0u32, |r, &b| (r * 256 + b as u32) % p);
        let g = 65537 % p;
        let mut x = 1;
        for _ in 0..p {
            if x == residue {
                return true;
            }
            x = x * g % p;
        }
        false
    })
}

fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN") {
            current = Some(format!("{line}\n"));
        } else if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END") {
                blocks.push(current.take().unwrap_or_default());
            }
        }
    }
    blocks
}

fn signature_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" | "Ed25519" => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_moduli_do_not_have_the_roca_fingerprint() {
        // Real generated keys: aws-lc-rs, a few of them.
        for _ in 0..4 {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let n = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(
                aws_lc_rs::signature::KeyPair::public_key(&kp),
            )
            .n;
            assert!(!has_roca_fingerprint(&n));
        }
    }

    #[test]
    fn a_modulus_in_the_65537_subgroup_everywhere_is_flagged() {
        // 65537^k itself is, by construction, in the subgroup modulo every prime.
        let mut n: Vec<u8> = vec![1];
        for _ in 0..40 {
            // n *= 65537 (big-endian bytes)
            let mut carry = 0u64;
            for b in n.iter_mut().rev() {
                let v = *b as u64 * 65537 + carry;
                *b = (v & 0xff) as u8;
                carry = v >> 8;
            }
            while carry > 0 {
                n.insert(0, (carry & 0xff) as u8);
                carry >>= 8;
            }
        }
        assert!(has_roca_fingerprint(&n));
    }
}
