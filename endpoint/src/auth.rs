//! Who a client is: bearer tokens (only their SHA-256 is known) or trust.
//!
//! A secret comes from `Authorization: Bearer <secret>` or `?token=<secret>`. It matches a token when
//! sha256(secret) equals the token's digest; every token is compared, in constant time, whatever matches.

use sha2::{Digest, Sha256};

use crate::api::Token;
use crate::config::Auth;
use crate::feed::Feed;
use crate::http::Head;
use crate::hub::Kind;

/// What an authenticated client may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    /// The digest of the token used; `None` under trust (never revoked).
    pub token: Option<[u8; 32]>,
    /// Labels it may read; `None`: all.
    pub labels: Option<Vec<String>>,
    /// Whether it may read changes, not only versions.
    pub rows: bool,
}

impl Principal {
    pub fn trust() -> Principal {
        Principal {
            token: None,
            labels: None,
            rows: true,
        }
    }

    pub fn allows(&self, label: &str) -> bool {
        self.labels.as_ref().is_none_or(|ls| ls.iter().any(|l| l == label))
    }

    /// Whether a (changed) token still covers everything a client is subscribed to.
    pub fn covers(&self, kind: &Kind) -> bool {
        let feeds_ok = |f: &Feed| self.rows && f.labels.iter().all(|l| self.allows(l));
        match kind {
            Kind::Plain => true,
            Kind::Ws(ws) => ws.versions.keys().all(|l| self.allows(l)) && ws.feeds.values().all(feeds_ok),
            Kind::Sse(f) => feeds_ok(f),
            Kind::LongPoll(lp) => feeds_ok(&lp.feed),
        }
    }

    /// The principal of the same token in a new token list; `None` when the token is gone.
    pub fn refreshed(&self, tokens: &[Token]) -> Option<Principal> {
        let digest = self.token?;
        lookup(tokens, &digest).map(|t| from_token(t, digest))
    }
}

fn from_token(t: &Token, digest: [u8; 32]) -> Principal {
    Principal {
        token: Some(digest),
        labels: Some(t.labels.clone()),
        rows: t.rows,
    }
}

/// The secret a request presents: the bearer header wins over `?token=`.
pub(crate) fn presented_secret(head: &Head, query_token: Option<&str>) -> Option<String> {
    if let Some(v) = head.header("authorization") {
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
            return Some(rest.trim().to_string());
        }
    }
    query_token.filter(|t| !t.is_empty()).map(str::to_string)
}

/// Authenticates a presented secret; `None`: refuse with 401.
pub(crate) fn authenticate(mode: Auth, tokens: &[Token], secret: Option<&str>) -> Option<Principal> {
    match mode {
        Auth::Trust => Some(Principal::trust()),
        Auth::Token => {
            let digest: [u8; 32] = Sha256::digest(secret?.as_bytes()).into();
            lookup(tokens, &digest).map(|t| from_token(t, digest))
        }
    }
}

fn lookup<'a>(tokens: &'a [Token], digest: &[u8; 32]) -> Option<&'a Token> {
    let mut found = None;
    for t in tokens {
        let same = constant_time_eq(&t.sha256, digest);
        if same && found.is_none() {
            found = Some(t);
        }
    }
    found
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, labels: &[&str], rows: bool) -> Token {
        Token {
            name: secret.to_uppercase(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            rows,
        }
    }

    #[test]
    fn matches_by_digest_and_scopes_labels() {
        let tokens = vec![token("a", &["x"], true), token("b", &["y", "z"], false)];
        let p = authenticate(Auth::Token, &tokens, Some("b")).unwrap();
        assert!(p.allows("z") && !p.allows("x") && !p.rows);
        assert!(authenticate(Auth::Token, &tokens, Some("c")).is_none());
        assert!(authenticate(Auth::Token, &tokens, None).is_none());
        assert_eq!(authenticate(Auth::Trust, &[], None), Some(Principal::trust()));
        assert!(p.refreshed(&tokens[..1]).is_none());
        assert_eq!(p.refreshed(&tokens), Some(p.clone()));
    }
}
