//! Interlock's `com.docker.lb.*` service labels, read into a `RouteSpec`.
//!
//! Strict on purpose: a label meshd cannot use exactly as written (a malformed host, an
//! unknown key such as `com.docker.lb.ports`, a redirect that is not a URL) rejects that
//! one service's route, with every reason at once, rather than being guessed at or
//! half-applied. The rest of the cluster's routes never see it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The prefix of every label the L7 front end reads.
pub const PREFIX: &str = "com.docker.lb.";

/// Every key Interlock defines, as meshd reads them.
const KEYS: [&str; 19] = [
    "hosts",
    "port",
    "network",
    "context_root",
    "context_root_rewrite",
    "redirects",
    "ssl_only",
    "ssl_cert",
    "ssl_key",
    "ssl_passthrough",
    "ssl_backend",
    "ssl_backend_tls_verify",
    "sticky_session_cookie",
    "ip_hash",
    "websocket_endpoints",
    "backend_mode",
    "service_cluster",
    "default_backend",
    // Interlock's own proxy template: meshd has none to replace.
    "template",
];

/// One service's route, as its labels ask for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// Host names, lower case, without a port (the `Host` header's port is not matched).
    pub hosts: Vec<String>,
    /// The port inside the service's tasks.
    pub port: u16,
    /// Which of the service's networks to reach it on (by name or id, as written).
    pub network: Option<String>,
    /// A path prefix (`/app`); None: the whole host.
    pub context_root: Option<String>,
    /// Strip `context_root` from the path before sending upstream.
    pub context_root_rewrite: bool,
    pub redirects: Vec<Redirect>,
    /// Plain HTTP requests get a redirect to HTTPS.
    pub ssl_only: bool,
    /// The certificate and key to terminate TLS with (names of Docker configs or files).
    pub ssl_cert: Option<String>,
    pub ssl_key: Option<String>,
    /// TLS is not terminated: connections are routed by SNI to the tasks as they are.
    pub ssl_passthrough: bool,
    /// TLS to the tasks as well.
    pub ssl_backend: bool,
    pub ssl_backend_tls_verify: TlsVerify,
    /// Requests carrying this cookie keep the task it names.
    pub sticky_session_cookie: Option<String>,
    /// A client address keeps its task.
    pub ip_hash: bool,
    /// Paths whose requests may upgrade to websockets (empty: any path may).
    pub websocket_endpoints: Vec<String>,
    pub backend_mode: BackendMode,
    pub service_cluster: Option<String>,
    /// Serves requests for hosts no route names.
    pub default_backend: bool,
}

/// `source,target`: requests to `source` are redirected to `target`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Redirect {
    pub from_host: String,
    pub from_https: bool,
    pub to: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsVerify {
    #[default]
    None,
    Required,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// To the tasks' own addresses (Interlock's default).
    #[default]
    Task,
    /// To the service's VIP.
    Vip,
}

/// Reads a service's labels: None when it has no `com.docker.lb.*` label; Err with every
/// problem found, in label order.
pub fn parse(labels: &BTreeMap<String, String>) -> Option<Result<RouteSpec, Vec<String>>> {
    let ours: BTreeMap<&str, &str> = labels
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(PREFIX)?, v.trim())))
        .collect();
    if ours.is_empty() {
        return None;
    }
    let mut p = Problems::default();
    for k in ours.keys() {
        if !KEYS.contains(k) {
            p.add(k, format!("unknown label{}", suggestion(k)));
        } else if *k == "template" {
            p.add(
                k,
                "meshd has no proxy template to replace; remove it".into(),
            );
        }
    }
    let get = |k: &str| ours.get(k).copied();
    let mut spec = RouteSpec {
        default_backend: p.boolean("default_backend", get("default_backend")),
        ..RouteSpec::default()
    };
    match get("hosts") {
        Some(v) => spec.hosts = p.hosts(v),
        None if spec.default_backend => {}
        None => p.add(
            "hosts",
            "missing: the host names to route to this service".into(),
        ),
    }
    match get("port") {
        Some(v) => match v.parse::<u16>() {
            Ok(port) if port > 0 => spec.port = port,
            _ => p.add("port", format!("{v:?} is not a port (1-65535)")),
        },
        None => p.add(
            "port",
            "missing: the port inside the service's tasks to send requests to".into(),
        ),
    }
    spec.network = p.name("network", get("network"));
    if let Some(v) = get("context_root") {
        spec.context_root = p.path("context_root", v);
    }
    spec.context_root_rewrite = p.boolean("context_root_rewrite", get("context_root_rewrite"));
    if spec.context_root_rewrite && spec.context_root.is_none() {
        p.add(
            "context_root_rewrite",
            "needs com.docker.lb.context_root (the prefix to take off)".into(),
        );
    }
    if let Some(v) = get("redirects") {
        spec.redirects = p.redirects(v);
    }
    spec.ssl_only = p.boolean("ssl_only", get("ssl_only"));
    spec.ssl_cert = p.name("ssl_cert", get("ssl_cert"));
    spec.ssl_key = p.name("ssl_key", get("ssl_key"));
    spec.ssl_passthrough = p.boolean("ssl_passthrough", get("ssl_passthrough"));
    spec.ssl_backend = p.boolean("ssl_backend", get("ssl_backend"));
    match get("ssl_backend_tls_verify") {
        None | Some("none") => {}
        Some("required") => spec.ssl_backend_tls_verify = TlsVerify::Required,
        Some(v) => p.add(
            "ssl_backend_tls_verify",
            format!("{v:?}: must be none or required"),
        ),
    }
    if spec.ssl_backend_tls_verify == TlsVerify::Required && !spec.ssl_backend {
        p.add(
            "ssl_backend_tls_verify",
            "needs com.docker.lb.ssl_backend=true".into(),
        );
    }
    match (&spec.ssl_cert, &spec.ssl_key) {
        (Some(_), None) => p.add("ssl_key", "missing: ssl_cert needs its key".into()),
        (None, Some(_)) => p.add("ssl_cert", "missing: ssl_key needs its certificate".into()),
        _ => {}
    }
    if spec.ssl_passthrough {
        for (k, set) in [
            ("ssl_cert", spec.ssl_cert.is_some()),
            ("context_root", spec.context_root.is_some()),
            (
                "sticky_session_cookie",
                get("sticky_session_cookie").is_some(),
            ),
            ("redirects", !spec.redirects.is_empty()),
        ] {
            if set {
                p.add(
                    k,
                    "cannot apply with ssl_passthrough (meshd does not see inside that TLS)".into(),
                );
            }
        }
    }
    if spec.ssl_only && spec.ssl_cert.is_none() && !spec.ssl_passthrough {
        p.add(
            "ssl_only",
            "needs com.docker.lb.ssl_cert and ssl_key (or ssl_passthrough): nothing would serve HTTPS".into(),
        );
    }
    if let Some(v) = get("sticky_session_cookie") {
        if !v.is_empty() && v.bytes().all(is_token_byte) {
            spec.sticky_session_cookie = Some(v.to_string());
        } else {
            p.add(
                "sticky_session_cookie",
                format!("{v:?} is not a cookie name"),
            );
        }
    }
    spec.ip_hash = p.boolean("ip_hash", get("ip_hash"));
    if spec.ip_hash && spec.sticky_session_cookie.is_some() {
        p.add(
            "ip_hash",
            "cannot apply with sticky_session_cookie: choose one".into(),
        );
    }
    if let Some(v) = get("websocket_endpoints") {
        spec.websocket_endpoints = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .filter_map(|s| p.path("websocket_endpoints", s))
            .collect();
    }
    match get("backend_mode") {
        None | Some("task") => {}
        Some("vip") => spec.backend_mode = BackendMode::Vip,
        Some(v) => p.add("backend_mode", format!("{v:?}: must be task or vip")),
    }
    spec.service_cluster = p.name("service_cluster", get("service_cluster"));
    if p.0.is_empty() {
        Some(Ok(spec))
    } else {
        Some(Err(p.0))
    }
}

/// The problems found so far, each as `com.docker.lb.KEY: reason`.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, key: &str, reason: String) {
        self.0.push(format!("{PREFIX}{key}: {reason}"));
    }

    /// Go's `strconv.ParseBool`, as Interlock reads its booleans; absent is false.
    fn boolean(&mut self, key: &str, v: Option<&str>) -> bool {
        match v {
            None => false,
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => true,
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => false,
            Some(v) => {
                self.add(key, format!("{v:?} is not true or false"));
                false
            }
        }
    }

    /// A name (network, secret or config, service cluster): Docker's name characters.
    fn name(&mut self, key: &str, v: Option<&str>) -> Option<String> {
        let v = v?;
        let ok = !v.is_empty()
            && v.len() <= 255
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Some(v.to_string())
        } else {
            self.add(key, format!("{v:?} is not a name (letters, digits, _ . -)"));
            None
        }
    }

    fn hosts(&mut self, v: &str) -> Vec<String> {
        let mut out = Vec::new();
        for h in v.split(',').map(str::trim) {
            if h.is_empty() {
                continue;
            }
            match host_name(h) {
                Ok(h) if !out.contains(&h) => out.push(h),
                Ok(_) => {}
                Err(why) => self.add("hosts", format!("{h:?} {why}")),
            }
        }
        if out.is_empty() && self.0.iter().all(|p| !p.contains("lb.hosts:")) {
            self.add("hosts", "no host name given".into());
        }
        out
    }

    /// A path (`/app`): absolute, no query or fragment, no spaces; a trailing `/` dropped.
    fn path(&mut self, key: &str, v: &str) -> Option<String> {
        let ok = v.starts_with('/')
            && v.len() <= 1024
            && v.bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'\\'))
            && !v.split('/').any(|seg| seg == "..");
        if !ok {
            self.add(
                key,
                format!("{v:?} is not a path (starts with /, no spaces, ? # \\ or ..)"),
            );
            return None;
        }
        let trimmed = v.trim_end_matches('/');
        Some(if trimmed.is_empty() { "/" } else { trimmed }.to_string())
    }

    /// `source,target;source,target`: absolute http(s) URLs.
    fn redirects(&mut self, v: &str) -> Vec<Redirect> {
        let mut out = Vec::new();
        for pair in v.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((from, to)) = pair.split_once(',') else {
                self.add("redirects", format!("{pair:?} is not source,target"));
                continue;
            };
            let (from, to) = (from.trim(), to.trim());
            match (url_host(from), url_host(to)) {
                (Ok((from_https, from_host)), Ok(_)) => out.push(Redirect {
                    from_host,
                    from_https,
                    to: to.to_string(),
                }),
                (Err(why), _) | (_, Err(why)) => self.add("redirects", format!("{pair:?}: {why}")),
            }
        }
        out
    }
}

/// A host name as routes match it: lower case, no trailing dot; RFC 1123 labels.
pub fn host_name(h: &str) -> Result<String, &'static str> {
    let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    if h.contains(':') {
        return Err("has a port: name the host alone (the Host header's port is not matched)");
    }
    if h.is_empty() || h.len() > 253 {
        return Err("is not a host name");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.split('.').all(label_ok) {
        Ok(h)
    } else {
        Err("is not a host name (letters, digits and -, between dots)")
    }
}

/// The scheme (https?) and host of an absolute http(s) URL.
fn url_host(u: &str) -> Result<(bool, String), String> {
    let (https, rest) = if let Some(r) = u.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = u.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{u:?} is not an http:// or https:// URL"));
    };
    if u.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!("{u:?} has spaces or control characters"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => authority,
    };
    host_name(host)
        .map(|h| (https, h))
        .map_err(|why| format!("{host:?} {why}"))
}

/// RFC 6265 cookie-name: an RFC 7230 token.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// ` (did you mean com.docker.lb.X?)` for a key one or two edits from a known one.
fn suggestion(key: &str) -> String {
    KEYS.iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean {PREFIX}{k}?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
            .collect()
    }

    fn ok(pairs: &[(&str, &str)]) -> RouteSpec {
        parse(&labels(pairs)).expect("has labels").expect("valid")
    }

    fn problems(pairs: &[(&str, &str)]) -> Vec<String> {
        parse(&labels(pairs)).expect("has labels").unwrap_err()
    }

    #[test]
    fn no_lb_label_is_no_route() {
        let mut l = BTreeMap::new();
        l.insert("com.docker.stack.namespace".to_string(), "demo".to_string());
        assert!(parse(&l).is_none());
    }

    #[test]
    fn every_label_with_interlocks_meaning() {
        let s = ok(&[
            ("hosts", "Shop.Example.com, api.example.com,shop.example.com"),
            ("port", "8080"),
            ("network", "demo_front"),
            ("context_root", "/app/"),
            ("context_root_rewrite", "true"),
            (
                "redirects",
                "http://old.example.com,http://shop.example.com; https://x.example.com:8443/a,https://shop.example.com",
            ),
            ("ssl_only", "1"),
            ("ssl_cert", "shop.example.com.cert"),
            ("ssl_key", "shop.example.com.key"),
            ("ssl_backend", "True"),
            ("ssl_backend_tls_verify", "required"),
            ("sticky_session_cookie", "app_session"),
            ("websocket_endpoints", "/ws, /live/"),
            ("backend_mode", "vip"),
            ("service_cluster", "us-east"),
        ]);
        assert_eq!(s.hosts, ["shop.example.com", "api.example.com"]);
        assert_eq!(s.port, 8080);
        assert_eq!(s.network.as_deref(), Some("demo_front"));
        assert_eq!(s.context_root.as_deref(), Some("/app"));
        assert!(s.context_root_rewrite && s.ssl_only && s.ssl_backend);
        assert_eq!(s.redirects.len(), 2);
        assert_eq!(s.redirects[1].from_host, "x.example.com");
        assert!(s.redirects[1].from_https);
        assert_eq!(s.ssl_backend_tls_verify, TlsVerify::Required);
        assert_eq!(s.sticky_session_cookie.as_deref(), Some("app_session"));
        assert_eq!(s.websocket_endpoints, ["/ws", "/live"]);
        assert_eq!(s.backend_mode, BackendMode::Vip);
        assert_eq!(s.service_cluster.as_deref(), Some("us-east"));
        let p = ok(&[
            ("hosts", "tcp.example.com"),
            ("port", "443"),
            ("ssl_passthrough", "true"),
        ]);
        assert!(p.ssl_passthrough);
        let d = ok(&[("default_backend", "true"), ("port", "80")]);
        assert!(d.default_backend && d.hosts.is_empty());
    }

    #[test]
    fn the_seeds_typo_and_other_mistakes_are_named() {
        let p = problems(&[("hosts", "shop.example.com"), ("ports", "8080")]);
        assert!(
            p.iter().any(|m| m
                .contains("com.docker.lb.ports: unknown label (did you mean com.docker.lb.port?)")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("lb.port: missing")), "{p:?}");
        for (pairs, needle) in [
            (
                vec![("hosts", "shop example.com"), ("port", "80")],
                "is not a host name",
            ),
            (
                vec![("hosts", "shop.example.com:8080"), ("port", "80")],
                "has a port",
            ),
            (vec![("hosts", ","), ("port", "80")], "no host name"),
            (vec![("hosts", "a.b"), ("port", "0")], "is not a port"),
            (vec![("hosts", "a.b"), ("port", "99999")], "is not a port"),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("context_root", "app")],
                "is not a path",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("context_root", "/a/../b"),
                ],
                "is not a path",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("redirects", "http://a.b"),
                ],
                "not source,target",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("redirects", "ftp://a.b,http://c.d"),
                ],
                "not an http",
            ),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("ssl_cert", "c")],
                "ssl_cert needs its key",
            ),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("ssl_only", "yes")],
                "not true or false",
            ),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("ssl_only", "true")],
                "nothing would serve HTTPS",
            ),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("backend_mode", "dnsrr")],
                "task or vip",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("ip_hash", "true"),
                    ("sticky_session_cookie", "s"),
                ],
                "choose one",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("sticky_session_cookie", "a b"),
                ],
                "not a cookie name",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("ssl_passthrough", "true"),
                    ("context_root", "/x"),
                ],
                "ssl_passthrough",
            ),
            (
                vec![
                    ("hosts", "a.b"),
                    ("port", "80"),
                    ("ssl_backend_tls_verify", "required"),
                ],
                "needs com.docker.lb.ssl_backend",
            ),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("network", "a/b")],
                "is not a name",
            ),
            (
                vec![("hosts", "a.b"), ("port", "80"), ("template", "x")],
                "no proxy template",
            ),
        ] {
            let p = problems(&pairs);
            assert!(
                p.iter().any(|m| m.contains(needle)),
                "{pairs:?}: {p:?} lacks {needle:?}"
            );
        }
    }

    proptest! {
        /// Any label values at all: parse never panics, a rejection always says why, and
        /// what it accepts is what routes can use (lower-case names, absolute paths, a port).
        #[test]
        fn any_labels_parse_or_are_rejected_with_reasons(
            entries in proptest::collection::btree_map(
                prop_oneof![
                    proptest::sample::select(KEYS.to_vec()).prop_map(str::to_string),
                    "[a-z_]{1,12}",
                ],
                prop_oneof![
                    "\\PC{0,40}",
                    "[a-zA-Z0-9.,:/; -]{0,40}",
                    proptest::sample::select(vec!["true", "false", "80", "/app", "vip", "a.example.com"]).prop_map(str::to_string),
                ],
                0..8,
            )
        ) {
            let l: BTreeMap<String, String> = entries.into_iter().map(|(k, v)| (format!("{PREFIX}{k}"), v)).collect();
            match parse(&l) {
                None => prop_assert!(l.is_empty()),
                Some(Err(p)) => {
                    prop_assert!(!p.is_empty());
                    prop_assert!(p.iter().all(|m| m.starts_with(PREFIX) && m.len() > PREFIX.len() + 3));
                }
                Some(Ok(s)) => {
                    prop_assert!(s.port > 0);
                    prop_assert!(!s.hosts.is_empty() || s.default_backend);
                    for h in &s.hosts {
                        prop_assert_eq!(host_name(h), Ok(h.clone()));
                    }
                    for p in s.context_root.iter().chain(&s.websocket_endpoints) {
                        prop_assert!(p.starts_with('/'));
                    }
                    prop_assert_eq!(s.ssl_cert.is_some(), s.ssl_key.is_some());
                }
            }
        }
    }
}
