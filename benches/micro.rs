//! Microbenchmarks of the request path's pieces: `cargo bench --bench micro`.
//! Uncached verification per algorithm (and the RustCrypto verifiers openidconnect uses, on the same
//! tokens, for the backend comparison), a token-cache hit, identity mapping, header strip+inject, and a
//! sync-cache hit. See BENCHMARKS.md for figures.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use devkit::unix_now;
use devkit::{LocalIssuer, SigningAlg};
use divan::Bencher;
use idsync::access::policy::{self, Known};
use idsync::access::{
    Gatekeeper, IssuerRegistry, IssuerSpec, MissingTenant, OnDbError, TenantPolicy,
};
use idsync::http::headers::{self, HeaderNames};
use idsync::identity::{ClaimPath, Dialect, MappingRules, RoleMap, map_claims};
use idsync::oidc::{IdpClient, KeyCacheOptions, KeySource, VerifyOptions};
use idsync::provision::{CacheBudget, Provisioned, Provisioner, Scope, SyncOptions};
use serde_json::{Map, Value, json};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn main() {
    divan::main();
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    verifiers: Vec<(SigningAlg, IssuerRegistry, String, Value)>,
    auth: Gatekeeper,
    cached_token: String,
    provisioner: Arc<Provisioner>,
    keycloak: Map<String, Value>,
    frontegg: Map<String, Value>,
    _dir: tempfile::TempDir,
}

fn rules(dialect: Dialect) -> MappingRules {
    MappingRules {
        dialect,
        tenant_claim: ClaimPath::new("tenant_id").unwrap(),
        roles_claim: ClaimPath::new("roles").unwrap(),
        id_prefix: None,
    }
}

fn tenant_policy() -> TenantPolicy {
    let app_roles: Vec<String> = ["admin", "member", "viewer"].map(String::from).to_vec();
    TenantPolicy {
        missing: MissingTenant::Reject,
        roles: RoleMap::new(&app_roles, &[], "member").unwrap(),
    }
}

/// A registry of one issuer whose keys come from a file: no network in the measured path.
async fn registry(
    issuer: &LocalIssuer,
    path: std::path::PathBuf,
    dialect: Dialect,
) -> IssuerRegistry {
    std::fs::write(&path, issuer.jwks_document().to_string()).unwrap();
    let spec = IssuerSpec {
        issuer: issuer.issuer().into(),
        dialect,
        audiences: vec![],
        authorized_parties: vec![],
        require_typ: None,
        source: KeySource::File(path),
        tenant_claim: ClaimPath::new("tenant_id").unwrap(),
        roles_claim: ClaimPath::new("roles").unwrap(),
        id_prefix: None,
        logout_audiences: vec![],
        webhook_secret: None,
    };
    let client = IdpClient::new(None, Duration::from_secs(5)).unwrap();
    let opts = VerifyOptions {
        leeway_secs: 60,
        max_token_bytes: 16384,
    };
    let r = IssuerRegistry::new(&[spec], &client, &key_opts(), opts, None);
    for i in r.iter() {
        i.keys().load_now().await.unwrap();
    }
    r
}

fn key_opts() -> KeyCacheOptions {
    KeyCacheOptions {
        refresh_interval: Duration::from_secs(600),
        refetch_cooldown: Duration::from_secs(30),
        max_stale: Duration::from_secs(86400),
        file_poll: Duration::from_secs(5),
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let verifiers = rt.block_on(async {
            let mut out = Vec::new();
            for alg in [
                SigningAlg::RS256,
                SigningAlg::PS256,
                SigningAlg::ES256,
                SigningAlg::EdDSA,
            ] {
                let issuer = LocalIssuer::start("/realms/bench", alg).await.unwrap();
                let path = dir.path().join(format!("{alg:?}.json"));
                let verifier = registry(&issuer, path, Dialect::Keycloak).await;
                let mut claims = issuer.claims_for("bench-user");
                claims["exp"] = json!(unix_now() + 86_400);
                let token = issuer.mint(claims);
                let jwk = issuer.jwks_document()["keys"][0].clone();
                out.push((alg, verifier, token, jwk));
            }
            out
        });
        let provisioner = rt.block_on(async {
            let mut opts = sea_orm::ConnectOptions::new("sqlite::memory:");
            opts.max_connections(1).sqlx_logging(false);
            let db = sea_orm::Database::connect(opts).await.unwrap();
            <migration::Migrator as migration::MigratorTrait>::up(&db, None)
                .await
                .unwrap();
            Arc::new(Provisioner::new(
                db,
                SyncOptions {
                    tenant_schema: None,
                    cache: CacheBudget {
                        bytes: 1 << 30,
                        entries: 100_000,
                    },
                    cache_ttl: Duration::from_secs(300),
                    last_seen_interval: Duration::from_secs(300),
                    write_timeout: Duration::from_secs(3),
                },
            ))
        });
        // A gatekeeper over a separate RS256 issuer, with its token cached.
        let (auth, cached_token) = rt.block_on(async {
            let issuer = LocalIssuer::start("/realms/cache", SigningAlg::RS256)
                .await
                .unwrap();
            let registry =
                registry(&issuer, dir.path().join("cache.json"), Dialect::Keycloak).await;
            let auth = Gatekeeper::new(
                Arc::new(registry),
                CacheBudget {
                    bytes: 1 << 30,
                    entries: 100_000,
                },
                tenant_policy(),
                provisioner.clone(),
                OnDbError::Fail,
            );
            let mut claims = issuer.claims_for("cached-user");
            claims["exp"] = json!(unix_now() + 86_400);
            let token = issuer.mint(claims);
            auth.authenticate(&token, unix_now()).await.unwrap();
            (auth, token)
        });
        let keycloak: Map<String, Value> = serde_json::from_str(include_str!(
            "../tests/fixtures/claims/keycloak-26-access-token.json"
        ))
        .unwrap();
        let frontegg: Map<String, Value> = serde_json::from_str(include_str!(
            "../tests/fixtures/claims/frontegg-user-token.json"
        ))
        .unwrap();
        Fixture {
            rt,
            verifiers,
            auth,
            cached_token,
            provisioner,
            keycloak,
            frontegg,
            _dir: dir,
        }
    })
}

#[divan::bench(args = ["RS256", "PS256", "ES256", "EdDSA"])]
fn verify_uncached(bencher: Bencher, alg: &str) {
    let f = fixture();
    let (_, verifier, token, _) = f
        .verifiers
        .iter()
        .find(|(a, ..)| format!("{a:?}") == alg)
        .unwrap();
    let now = unix_now();
    bencher.bench(|| {
        f.rt.block_on(verifier.verify(divan::black_box(token), now))
            .unwrap()
    });
}

fn split(token: &str) -> (String, Vec<u8>) {
    let (input, sig) = token.rsplit_once('.').unwrap();
    (input.to_owned(), URL_SAFE_NO_PAD.decode(sig).unwrap())
}

/// RS256 through the RustCrypto `rsa` crate (what openidconnect verifies with), on the same token.
#[divan::bench]
fn verify_rustcrypto_rs256(bencher: Bencher) {
    use rsa::signature::Verifier as _;
    let f = fixture();
    let (_, _, token, jwk) = f
        .verifiers
        .iter()
        .find(|(a, ..)| *a == SigningAlg::RS256)
        .unwrap();
    let n =
        rsa::BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap());
    let e =
        rsa::BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap());
    let key =
        rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(rsa::RsaPublicKey::new(n, e).unwrap());
    let (input, sig) = split(token);
    let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice()).unwrap();
    bencher.bench(|| {
        key.verify(divan::black_box(input.as_bytes()), &sig)
            .unwrap()
    });
}

/// ES256 through the RustCrypto `p256` crate, on the same token.
#[divan::bench]
fn verify_rustcrypto_es256(bencher: Bencher) {
    use p256::ecdsa::signature::Verifier as _;
    let f = fixture();
    let (_, _, token, jwk) = f
        .verifiers
        .iter()
        .find(|(a, ..)| *a == SigningAlg::ES256)
        .unwrap();
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let (input, sig) = split(token);
    let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
    bencher.bench(|| {
        key.verify(divan::black_box(input.as_bytes()), &sig)
            .unwrap()
    });
}

/// The signature check alone in aws-lc-rs, the backend idsync uses, with the key parsed once: the floor
/// under `verify_uncached`, which adds parsing, key lookup and claim checks.
#[divan::bench(args = ["RS256", "ES256"])]
fn verify_aws_lc_signature_only(bencher: Bencher, alg: &str) {
    use aws_lc_rs::signature::{self, ParsedPublicKey, VerificationAlgorithm};
    let f = fixture();
    let alg = if alg == "RS256" {
        SigningAlg::RS256
    } else {
        SigningAlg::ES256
    };
    let (_, _, token, jwk) = f.verifiers.iter().find(|(a, ..)| *a == alg).unwrap();
    let b64 = |k: &str| URL_SAFE_NO_PAD.decode(jwk[k].as_str().unwrap()).unwrap();
    let (algorithm, key): (&'static dyn VerificationAlgorithm, Vec<u8>) = match alg {
        SigningAlg::RS256 => (
            &signature::RSA_PKCS1_2048_8192_SHA256,
            rsa_public_key_der(&b64("n"), &b64("e")),
        ),
        _ => {
            let mut point = vec![4u8];
            point.extend(b64("x"));
            point.extend(b64("y"));
            (&signature::ECDSA_P256_SHA256_FIXED, point)
        }
    };
    let key = ParsedPublicKey::new(algorithm, key).unwrap();
    let (input, sig) = split(token);
    bencher.bench(|| {
        key.verify_sig(divan::black_box(input.as_bytes()), &sig)
            .unwrap()
    });
}

/// PKCS#1 `RSAPublicKey ::= SEQUENCE { n INTEGER, e INTEGER }` in DER, which aws-lc-rs parses.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn len(out: &mut Vec<u8>, n: usize) {
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let bytes: Vec<u8> = n
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
    }
    fn int(out: &mut Vec<u8>, v: &[u8]) {
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push(0x02);
        len(out, v.len() + pad as usize);
        if pad {
            out.push(0);
        }
        out.extend(v);
    }
    let mut body = Vec::new();
    int(&mut body, n);
    int(&mut body, e);
    let mut out = vec![0x30];
    len(&mut out, body.len());
    out.extend(body);
    out
}

#[divan::bench]
fn token_cache_hit(bencher: Bencher) {
    let f = fixture();
    let now = unix_now();
    bencher.bench(|| {
        f.rt.block_on(f.auth.authenticate(divan::black_box(&f.cached_token), now))
            .unwrap()
    });
}

#[divan::bench]
fn identity_keycloak(bencher: Bencher) {
    let f = fixture();
    let r = rules(Dialect::Keycloak);
    bencher.bench(|| {
        map_claims(
            "https://sso.example.com/realms/acme",
            divan::black_box(&f.keycloak),
            &r,
        )
        .unwrap()
    });
}

#[divan::bench]
fn identity_frontegg(bencher: Bencher) {
    let f = fixture();
    let r = rules(Dialect::Frontegg);
    bencher.bench(|| {
        map_claims(
            "https://acme.frontegg.com",
            divan::black_box(&f.frontegg),
            &r,
        )
        .unwrap()
    });
}

#[divan::bench]
fn header_strip_and_inject(bencher: Bencher) {
    let names = HeaderNames::new("X-").unwrap();
    let mut incoming = http::HeaderMap::new();
    for (k, v) in [
        ("host", "app"),
        ("accept", "*/*"),
        ("user-agent", "bench"),
        ("authorization", "Bearer x"),
        ("x-user-id", "spoof"),
        ("x-tenant-id", "t"),
        ("x-idsync-synced", "true"),
    ] {
        incoming.insert(
            http::HeaderName::from_static(k),
            http::HeaderValue::from_static(v),
        );
    }
    let view = Provisioned {
        user_id: Some("b2433b81-188f-4c01-b2ed-053bee5391d3".into()),
        email: Some("grace.turing@example.com".into()),
        name: Some("Grace Turing".into()),
        scope: Scope {
            role: Some("admin".into()),
            tenant_id: Some("38394337-9aff-503a-b737-e711338283d4".into()),
            tenant_slug: Some("acme".into()),
            ..Default::default()
        }
        .into_shared(),
        idp_roles_apply: true,
        synced: true,
    };
    let roles: Vec<String> = ["default-roles-acme", "admin", "editor"]
        .map(String::from)
        .to_vec();
    bencher
        .with_inputs(|| incoming.clone())
        .bench_local_values(|mut h| {
            headers::strip(&mut h, &names);
            headers::set_identity(
                &mut h,
                &names,
                &view,
                &roles,
                ["38394337-9aff-503a-b737-e711338283d4"].into_iter(),
            );
            h
        });
}

#[divan::bench]
fn sync_cache_hit(bencher: Bencher) {
    let f = fixture();
    let identity = map_claims(
        "https://sso.example.com/realms/acme",
        &f.keycloak,
        &rules(Dialect::Keycloak),
    )
    .unwrap();
    let p = tenant_policy();
    let plan = policy::decide(
        &identity,
        policy::target(&identity, None, &p).unwrap(),
        Known::Nothing,
        &p,
    )
    .unwrap()
    .plan;
    f.rt.block_on(f.provisioner.sync(&identity, &plan, None))
        .unwrap();
    bencher.bench(|| {
        f.rt.block_on(f.provisioner.sync(divan::black_box(&identity), &plan, None))
            .unwrap()
    });
}
