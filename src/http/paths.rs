//! One canonical form of a request path for every decision made on a path (`--skip-auth`, forward-auth's
//! original URI). Apps and their frameworks normalise paths in ways the raw string does not show: Tomcat,
//! Jetty and Spring drop `;` parameters (`/public/..;/private` is `/private`), most decode `%2e`, some
//! treat `\` or `%2f` as a separator. So: parameters are cut, each segment is percent-decoded once, `.`
//! and `..` are resolved; what could still mean something else to the app (`%2f`, `%5c`, `\`, `//`,
//! double encoding) is never public; what cannot be a path at all is refused (400).

/// A request path as decisions see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestPath {
    /// Resolved, decoded segments joined by `/`, with a trailing `/` when the path had one.
    Clean(String),
    /// Could resolve differently in the app; never matches a public prefix.
    Ambiguous,
}

/// Why a path is refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with /")]
    NotAbsolute,
    #[error("the path has a malformed percent-encoding")]
    BadEncoding,
    #[error("the path climbs above the root with ..")]
    AboveRoot,
}

/// The canonical form of `raw` (a path without its query).
pub fn canonical(raw: &str) -> Result<RequestPath, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut ambiguous = raw.contains('\\') || raw.contains("//");
    let mut segments: Vec<String> = Vec::new();
    let mut trailing = false;
    for raw_segment in raw[1..].split('/') {
        // `;` parameters are not part of the segment to Servlet containers; cut them for every app.
        let without_params = raw_segment.split(';').next().unwrap_or_default();
        let decoded = decode(without_params)?;
        let decoded = match String::from_utf8(decoded) {
            Ok(s) => s,
            Err(_) => {
                ambiguous = true;
                String::from_utf8_lossy(without_params.as_bytes()).into_owned()
            }
        };
        if decoded
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '%' | ';') || c.is_control())
        {
            ambiguous = true;
        }
        trailing = false;
        match decoded.as_str() {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing = true;
            }
            _ => segments.push(decoded),
        }
    }
    if ambiguous {
        return Ok(RequestPath::Ambiguous);
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Ok(RequestPath::Clean(out))
}

fn decode(s: &str) -> Result<Vec<u8>, PathError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEncoding)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEncoding)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Whether `path` falls under one of the (canonical) public prefixes, by whole segments.
pub fn is_public(prefixes: &[String], path: &RequestPath) -> bool {
    let RequestPath::Clean(path) = path else {
        return false;
    };
    prefixes.iter().any(|p| {
        let p = p.trim_end_matches('/');
        p.is_empty()
            || path == p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(s: &str) -> RequestPath {
        RequestPath::Clean(s.into())
    }

    #[test]
    fn dots_parameters_and_encoded_dots_resolve_like_the_app_would() {
        assert_eq!(canonical("/public/..;/private"), Ok(clean("/private")));
        assert_eq!(canonical("/public/%2e%2e/private"), Ok(clean("/private")));
        assert_eq!(
            canonical("/public/%2E%2E;x=1/private"),
            Ok(clean("/private"))
        );
        assert_eq!(
            canonical("/public/./logo.png"),
            Ok(clean("/public/logo.png"))
        );
        assert_eq!(canonical("/public/x;jsessionid=1"), Ok(clean("/public/x")));
        assert_eq!(canonical("/a/b/.."), Ok(clean("/a/")));
        assert_eq!(canonical("/"), Ok(clean("/")));
        assert_eq!(canonical("/caf%C3%A9"), Ok(clean("/café")));
    }

    #[test]
    fn what_could_mean_something_else_is_ambiguous() {
        for p in [
            "/public%2f..%2fprivate",
            "/public/..%5cprivate",
            "/public\\..\\private",
            "/public//x",
            "/public/%252e%252e/private",
            "/public/%00",
            "/public/%ff",
        ] {
            assert_eq!(canonical(p), Ok(RequestPath::Ambiguous), "{p}");
        }
    }

    #[test]
    fn what_cannot_be_a_path_is_refused() {
        assert_eq!(canonical("public"), Err(PathError::NotAbsolute));
        assert_eq!(canonical("/a/%zz"), Err(PathError::BadEncoding));
        assert_eq!(canonical("/a/%2"), Err(PathError::BadEncoding));
        assert_eq!(canonical("/../etc/passwd"), Err(PathError::AboveRoot));
        assert_eq!(canonical("/a/../../b"), Err(PathError::AboveRoot));
    }

    #[test]
    fn public_prefixes_match_whole_segments_of_clean_paths_only() {
        let p = vec!["/public".to_string(), "/assets/".to_string()];
        let public = |s: &str| is_public(&p, &canonical(s).unwrap());
        assert!(public("/public"));
        assert!(public("/public/logo.png"));
        assert!(public("/assets/app.js"));
        assert!(public("/public/a/../b"));
        assert!(!public("/publicity"));
        assert!(!public("/api"));
        assert!(!public("/public/..;/private"));
        assert!(!public("/public/%2e%2e/admin"));
        assert!(!public("/public//x"));
        assert!(
            !public("/Public/x"),
            "case-sensitive: a case-folding app gets auth, not a bypass"
        );
    }
}
