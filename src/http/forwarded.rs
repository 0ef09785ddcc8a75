//! `X-Forwarded-For/-Host/-Proto`, `Forwarded` (RFC 7239) and `X-Real-IP` as the app receives them. From a
//! peer in `--trusted-proxies` (the ingress in front), idsync appends its hop to what that proxy said;
//! from anyone else the client's copies are replaced with what idsync itself saw, so a client cannot pass
//! off an address, host or scheme as idsync's observation.

use http::{HeaderMap, HeaderName, HeaderValue, header};
use std::net::{IpAddr, SocketAddr};

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XF_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const XF_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XF_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Every name this module decides about, in canonical form.
const MANAGED: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
];

/// An address block, `10.0.0.0/8` or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a prefix length outside 0..={max}"))?,
        };
        Ok(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The peers whose forwarding headers idsync believes.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(blocks: Vec<Cidr>) -> Self {
        Self(blocks)
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(peer))
    }
}

/// Sets the forwarding headers for a request from `peer` whose `Host` was `host`.
pub fn apply(headers: &mut HeaderMap, trusted: &TrustedProxies, peer: SocketAddr) {
    // Spelling variants (`X_Forwarded_For`) are what CGI-style servers fold into the real one; no proxy
    // sends them, so they go whoever the peer is.
    let twins: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter(|k| MANAGED.contains(&&*super::headers::canonical(k.as_str())))
        .cloned()
        .collect();
    for t in twins {
        headers.remove(t);
    }
    let ip = peer.ip();
    let host = headers.get(header::HOST).cloned();
    // The peer's address as text, made once per request (the standard formatter costs more than the rest
    // of this function together).
    let ip_text = ip_text(ip);
    let node: std::borrow::Cow<str> = match ip {
        IpAddr::V6(_) => format!("\"[{ip_text}]\"").into(),
        IpAddr::V4(_) => ip_text.as_str().into(),
    };
    if trusted.trusts(ip) {
        let prior: Vec<&str> = headers
            .get_all(&XFF)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let xff = if prior.is_empty() {
            ip_text.clone()
        } else {
            format!("{}, {ip_text}", prior.join(", "))
        };
        let forwarded: Vec<&str> = headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let forwarded = if forwarded.is_empty() {
            own_forwarded(&node, host.as_ref())
        } else {
            format!("{}, for={node}", forwarded.join(", "))
        };
        set(headers, XFF, xff);
        set(headers, header::FORWARDED, forwarded);
        if !headers.contains_key(&XF_PROTO) {
            headers.insert(XF_PROTO, HeaderValue::from_static("http"));
        }
        if !headers.contains_key(&XF_HOST)
            && let Some(h) = &host
        {
            headers.insert(XF_HOST, h.clone());
        }
        if !headers.contains_key(&X_REAL_IP) {
            set(headers, X_REAL_IP, ip_text);
        }
    } else {
        for n in [&XF_PORT, &XF_HOST] {
            headers.remove(n);
        }
        set(
            headers,
            header::FORWARDED,
            own_forwarded(&node, host.as_ref()),
        );
        set(headers, XFF, ip_text.clone());
        set(headers, X_REAL_IP, ip_text);
        headers.insert(XF_PROTO, HeaderValue::from_static("http"));
        if let Some(h) = host {
            headers.insert(XF_HOST, h);
        }
    }
}

/// `ip` as `Display` writes it; IPv4 digit by digit, without the formatting machinery.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
}

fn own_forwarded(node: &str, host: Option<&HeaderValue>) -> String {
    let host = host.and_then(|h| h.to_str().ok());
    let mut f = String::with_capacity(32 + node.len() + host.map_or(0, str::len));
    f.push_str("for=");
    f.push_str(node);
    f.push_str(";proto=http");
    if let Some(h) = host {
        // RFC 7239 section 4: a value that is not a token is a quoted-string.
        f.push_str(";host=\"");
        f.extend(h.chars().filter(|c| !matches!(c, '"' | '\\')));
        f.push('"');
    }
    f
}

/// `value` becomes the header value without a copy.
fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    } else {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut ips: Vec<IpAddr> = [0u8, 1, 9, 10, 99, 100, 199, 200, 255]
            .iter()
            .flat_map(|&a| [a, 7, 10, 100].map(|b| IpAddr::from([a, b, 255 - a, a / 3])))
            .collect();
        ips.push("::1".parse().unwrap());
        ips.push("::ffff:10.0.0.1".parse().unwrap());
        ips.push("2001:db8::8a2e:370:7334".parse().unwrap());
        for ip in ips {
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example.com"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-port", HeaderValue::from_static("443"));
        h.insert("x-real-ip", HeaderValue::from_static("1.2.3.4"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x_forwarded_for", HeaderValue::from_static("5.6.7.8"));
        h
    }

    #[test]
    fn an_untrusted_peer_gets_idsyncs_own_view() {
        let mut h = spoofed();
        apply(
            &mut h,
            &TrustedProxies::default(),
            "10.1.2.3:5000".parse().unwrap(),
        );
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-real-ip"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example.com");
        assert_eq!(
            h["forwarded"],
            "for=10.1.2.3;proto=http;host=\"app.example.com\""
        );
        assert!(h.get("x-forwarded-port").is_none());
        assert!(h.get("x_forwarded_for").is_none());
    }

    #[test]
    fn a_trusted_peer_is_appended_to() {
        let mut h = spoofed();
        let trusted = TrustedProxies::new(vec![Cidr::parse("10.0.0.0/8").unwrap()]);
        apply(&mut h, &trusted, "10.1.2.3:5000".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "evil.example", "the ingress said so");
        assert_eq!(h["forwarded"], "for=1.2.3.4, for=10.1.2.3");
        assert_eq!(h["x-real-ip"], "1.2.3.4");
        assert!(
            h.get("x_forwarded_for").is_none(),
            "twins go even from a trusted peer"
        );
    }

    #[test]
    fn cidr_blocks_match_v4_v6_and_mapped_addresses() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("fd00::/8")
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }
}
