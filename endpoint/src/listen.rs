//! `changerelay.listen_addresses` → socket addresses, and the loopback rule for `auth = trust`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Resolves a comma-separated list like Postgres's `listen_addresses`: `localhost` (127.0.0.1 and, when this host
/// has IPv6 loopback, ::1), `*` (every IPv4 and IPv6 address), IP addresses, or host names.
pub fn resolve(list: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut push = |a: SocketAddr| {
        if !out.contains(&a) {
            out.push(a);
        }
    };
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "localhost" => {
                push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
                if ipv6_loopback_available() {
                    push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
                }
            }
            "*" => {
                push(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
                push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
            }
            _ => {
                let host = item.trim_start_matches('[').trim_end_matches(']');
                if let Ok(ip) = host.parse::<IpAddr>() {
                    push(SocketAddr::new(ip, port));
                    continue;
                }
                let found = (host, port)
                    .to_socket_addrs()
                    .map_err(|e| format!("could not resolve listen address \"{item}\": {e}"))?;
                for a in found {
                    push(a);
                }
            }
        }
    }
    if out.is_empty() {
        return Err("changerelay.listen_addresses names no address".into());
    }
    Ok(out)
}

/// Whether every address is a loopback address (what `auth = trust` requires).
pub fn all_loopback(addrs: &[SocketAddr]) -> bool {
    !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
}

fn ipv6_loopback_available() -> bool {
    std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_star_and_literals() {
        let l = resolve("localhost", 8432).unwrap();
        assert_eq!(l[0], "127.0.0.1:8432".parse().unwrap());
        assert!(all_loopback(&l));
        let s = resolve("*", 1).unwrap();
        assert_eq!(s.len(), 2);
        assert!(!all_loopback(&s));
        let lit = resolve(" 127.0.0.1 , [::1],127.0.0.1", 5).unwrap();
        assert_eq!(lit, vec!["127.0.0.1:5".parse().unwrap(), "[::1]:5".parse().unwrap()]);
        assert!(resolve(" , ", 5).is_err());
        assert!(resolve("no-such-host.invalid", 5).is_err());
        assert!(!all_loopback(&resolve("10.1.2.3", 5).unwrap()));
    }
}
