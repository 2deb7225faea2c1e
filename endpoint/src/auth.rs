//! Who a client is: bearer tokens (only their SHA-256 is known) or trust.
//!
//! A secret comes from `Authorization: Bearer <secret>` or `?token=<secret>`. It matches a token when
//! sha256(secret) equals the token's digest; every token is compared, in constant time, whatever matches.

use std::rc::Rc;

use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};

use crate::api::{ChangeRow, Token};
use crate::config::Auth;

/// What an authenticated client may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    /// The digest of the token used; `None` under trust (never revoked).
    pub token: Option<[u8; 32]>,
    /// Labels it may read; `None`: all.
    pub labels: Option<Vec<String>>,
    /// Whether it may read changes, not only versions.
    pub rows: bool,
    /// The token creator's role OID (0 under trust).
    pub role: u32,
    /// Sorted OIDs of the tables whose rows it may receive; `None` under trust (all).
    pub readable: Option<Rc<[u32]>>,
}

impl Principal {
    pub fn trust() -> Principal {
        Principal {
            token: None,
            labels: None,
            rows: true,
            role: 0,
            readable: None,
        }
    }

    /// Whether a change row may go to this client: its table is readable to the token and, when row-level
    /// security restricts the row, the token's role is in its audience.
    pub fn may_receive(&self, row: &ChangeRow) -> bool {
        let Some(readable) = &self.readable else {
            return true;
        };
        readable.binary_search(&row.relid).is_ok() && row.audience.as_ref().is_none_or(|a| a.contains(&self.role))
    }

    /// The bucket its requests to the worker are counted in: the token, or `None` (trust).
    pub fn token_key(&self) -> Option<[u8; 32]> {
        self.token
    }

    pub fn allows(&self, label: &str) -> bool {
        self.labels.as_ref().is_none_or(|ls| ls.iter().any(|l| l == label))
    }

    /// The principal of the same token in a new token list; `None` when the token is gone.
    pub fn refreshed(&self, tokens: &[Token]) -> Option<Principal> {
        let digest = self.token?;
        lookup(tokens, &digest).map(|t| from_token(t, digest))
    }
}

fn from_token(t: &Token, digest: [u8; 32]) -> Principal {
    let mut readable = t.readable.clone();
    readable.sort_unstable();
    readable.dedup();
    Principal {
        token: Some(digest),
        labels: Some(t.labels.clone()),
        rows: t.rows,
        role: t.role,
        readable: Some(readable.into()),
    }
}

/// The secret a request presents: the bearer header wins over `?token=`.
pub(crate) fn presented_secret(headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
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
            role: 10,
            readable: vec![3, 1, 2],
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
        let row = |relid, audience: Option<Vec<u32>>| ChangeRow {
            relid,
            audience,
            ..ChangeRow::default()
        };
        assert!(p.may_receive(&row(2, None)) && !p.may_receive(&row(4, None)));
        assert!(p.may_receive(&row(1, Some(vec![9, 10]))) && !p.may_receive(&row(1, Some(vec![9]))));
        assert!(Principal::trust().may_receive(&row(4, Some(vec![]))));
    }
}
