//! `Host` and `Origin` checks against DNS rebinding and cross-site WebSocket hijacking.
//!
//! Host (every request but `/health`): absent (no browser omits it), or `host[:port]` naming this server: a
//! listen address, the address the connection arrived at, or `localhost`, with the connection's port (no port:
//! 80 plain, 443 TLS); or an entry of `allowed_hosts`. A page on a rebound name (`evil.example:8432`) is
//! refused.
//!
//! Origin (WebSocket, SSE, long-poll, versions, status): absent (a non-browser client), or under trust a loopback
//! origin (`http(s)://localhost|127.x.x.x|[::1][:port]`), or under token auth one of `allowed_origins` or the
//! same host as the request's (valid) `Host`. `null` and other values are refused.

use std::net::IpAddr;

use crate::config::{loopback_host, parse_origin, split_host_port, Auth};
use crate::metrics::Refusal;
use crate::request::{Ctx, Head};
use crate::response::Response;

fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

fn same_ip(host: &str, ip: IpAddr) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|h| h == ip)
}

fn refuse(ctx: &Ctx, why: Refusal, code: &str, message: String) -> Response {
    ctx.shared.metrics.refused(why);
    Response::error(403, code, &message)
}

/// Checks `Host`.
pub(crate) fn check_host(head: &Head, ctx: &Ctx) -> Result<(), Response> {
    let Some(value) = head.header("host") else {
        return Ok(());
    };
    let bad = || {
        refuse(
            ctx,
            Refusal::Host,
            "forbidden_host",
            format!("Host {value:?} does not name this server"),
        )
    };
    let Some((host, port)) = split_host_port(value) else {
        return Err(bad());
    };
    let cfg = &ctx.shared.cfg;
    let tls = cfg.tls.is_some();
    let port = port.unwrap_or(default_port(tls));
    let listed = cfg
        .allowed_hosts
        .iter()
        .filter_map(|h| split_host_port(h))
        .any(|(h, p)| h == host && p.is_none_or(|p| p == port));
    if listed {
        return Ok(());
    }
    let local = ctx.conn.local;
    let ours = host == "localhost"
        || same_ip(&host, local.ip())
        || ctx
            .shared
            .listen
            .iter()
            .any(|a| !a.ip().is_unspecified() && same_ip(&host, a.ip()));
    let loopback_ok = cfg.auth != Auth::Trust || loopback_host(&host);
    if ours && port == local.port() && loopback_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Checks `Origin` (after [`check_host`]).
pub(crate) fn check_origin(head: &Head, ctx: &Ctx) -> Result<(), Response> {
    let Some(value) = head.header("origin") else {
        return Ok(());
    };
    let bad = |why: &str| {
        refuse(
            ctx,
            Refusal::Origin,
            "forbidden_origin",
            format!("Origin {value:?} is not allowed{why}"),
        )
    };
    let Some((scheme, host, port)) = parse_origin(value) else {
        return Err(bad(""));
    };
    let cfg = &ctx.shared.cfg;
    if cfg.auth == Auth::Trust {
        return if loopback_host(&host) {
            Ok(())
        } else {
            Err(bad(" (trust authentication accepts loopback origins only)"))
        };
    }
    let port = port.unwrap_or(default_port(scheme == "https"));
    let listed = cfg
        .allowed_origins
        .iter()
        .filter_map(|o| parse_origin(o))
        .any(|(s, h, p)| {
            let p = p.unwrap_or(default_port(s == "https"));
            s == scheme && h == host && p == port
        });
    let same_host = head
        .header("host")
        .and_then(split_host_port)
        .is_some_and(|(h, p)| h == host && p.unwrap_or(default_port(cfg.tls.is_some())) == port);
    if listed || same_host {
        Ok(())
    } else {
        Err(bad(" (add it to the allowed origins)"))
    }
}
