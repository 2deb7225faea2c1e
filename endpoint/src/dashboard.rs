//! The dashboard: a static page at `/` (with its script and style sheet), compiled into the library.
//!
//! Nothing is built or fetched at run time and the page loads nothing from elsewhere. It asks for a token
//! (typed in, kept in the browser's session storage), then polls `GET /status` every second and follows
//! the labels' versions over `/ws`. The answers carry a Content-Security-Policy that lets the page run only
//! its own script and style and talk only to this endpoint (`connect-src` names the page's own host for
//! `ws:`/`wss:` besides `'self'`), and may not be framed.

use crate::request::{Ctx, Head};
use crate::response::Response;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const SCRIPT: &str = include_str!("../dashboard/dashboard.js");
const STYLE: &str = include_str!("../dashboard/dashboard.css");

/// The dashboard's files by path: (content type, body).
pub(crate) fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX_HTML)),
        "/dashboard.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/dashboard.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}

/// One of the dashboard's files, with the headers that confine it.
pub(crate) fn serve(head: &Head, ctx: &Ctx, content_type: &'static str, body: &'static str) -> Response {
    Response {
        status: 200,
        headers: vec![("content-type", content_type.into())],
        body: body.into(),
    }
    .header(
        "content-security-policy",
        policy(head.header("host"), ctx.shared.cfg.tls.is_some()),
    )
    .header("x-content-type-options", "nosniff")
    .header("x-frame-options", "DENY")
    .header("referrer-policy", "no-referrer")
    .header("cache-control", "no-cache")
}

/// The Content-Security-Policy of the dashboard's answers. `host` is the request's `Host` (checked already);
/// it is named for WebSocket connections only when it is a plain `host[:port]`.
pub(crate) fn policy(host: Option<&str>, tls: bool) -> String {
    let plain = |h: &str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    let ws = match host.filter(|h| plain(h)) {
        Some(h) if tls => format!(" wss://{h}"),
        Some(h) => format!(" ws://{h}"),
        None => String::new(),
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'{ws}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_only_a_plain_host() {
        let p = policy(Some("127.0.0.1:8432"), false);
        assert!(p.contains("connect-src 'self' ws://127.0.0.1:8432;"), "{p}");
        assert!(policy(Some("[::1]:8432"), true).contains("connect-src 'self' wss://[::1]:8432;"));
        for odd in [None, Some(""), Some("a b"), Some("x;script-src *")] {
            assert!(policy(odd, false).contains("connect-src 'self';"), "{odd:?}");
        }
        assert!(p.starts_with("default-src 'none'; script-src 'self';"));
        assert!(p.contains("frame-ancestors 'none'"));
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        let (_, html) = asset("/").unwrap();
        assert!(html.contains("src=\"/dashboard.js\"") && html.contains("href=\"/dashboard.css\""));
        for external in ["http://", "https://", "//cdn", "<script>", "style=\""] {
            assert!(!html.contains(external), "{external}");
        }
        assert!(asset("/nosuch").is_none());
    }
}
