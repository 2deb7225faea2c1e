//! TLS: https:// and wss:// with a certificate generated in the test, plain HTTP refused on a TLS port,
//! clear errors for bad files, and token authentication on the network refused without TLS.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use changerelay_endpoint::{Auth, Config, TlsFiles, ToEndpoint};
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

struct Certs {
    dir: PathBuf,
    cert_der: CertificateDer<'static>,
}

impl Certs {
    fn new(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("changerelay-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("other-key.pem"), other.serialize_pem()).unwrap();
        std::fs::write(dir.join("garbage.pem"), "this is not PEM\n").unwrap();
        Certs {
            dir,
            cert_der: ck.cert.der().clone(),
        }
    }

    fn files(&self, cert: &str, key: &str) -> TlsFiles {
        TlsFiles {
            cert_chain: self.dir.join(cert),
            private_key: self.dir.join(key),
        }
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(certs: &Certs, addr: std::net::SocketAddr) -> Tls {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(certs.client(), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn https_and_wss_with_a_generated_certificate() {
    let certs = Certs::new("ok");
    let mut cfg = test_config(Auth::Token);
    cfg.tls = Some(certs.files("cert.pem", "key.pem"));
    let fake = Fake::start(cfg);
    fake.publish(ToEndpoint::Tokens(vec![token("s3cret", &["parameters"], true)]));
    let port = fake.addr.port();
    // https: health and an authenticated long-poll on one keep-alive connection.
    let mut s = tls_connect(&certs, fake.addr);
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes())
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(wait_until(Duration::from_secs(2), || {
        let rows = fake.commit_n("parameters", 1, 1, 0);
        s.write_all(
            format!(
                "GET /changes?labels=parameters&since={}&wait=0s HTTP/1.1\r\nHost: localhost:{port}\r\n\
                 Authorization: Bearer s3cret\r\n\r\n",
                cursor(rows[0].event_id - 16, u32::MAX)
            )
            .as_bytes(),
        )
        .unwrap();
        let r = read_response(&mut s);
        r.status == 200 && r.json()["changes"].as_array().is_some_and(|c| !c.is_empty())
    }));
    // wss: subscribe and get a live change.
    let tls = tls_connect(&certs, fake.addr);
    let (mut ws, resp) = tungstenite::client(format!("wss://localhost:{port}/ws?token=s3cret"), tls).unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(tungstenite::Message::text(
        json!({"op":"subscribe","labels":["parameters"],"changes":true,"versions":false}).to_string(),
    ))
    .unwrap();
    let mut got = Vec::new();
    let mut committed = false;
    while got.is_empty() {
        let v: serde_json::Value = match ws.read().unwrap() {
            tungstenite::Message::Text(t) => serde_json::from_str(&t).unwrap(),
            _ => continue,
        };
        if v["type"] == "subscribed" && !committed {
            fake.commit_n("parameters", 50, 1, 0);
            committed = true;
        } else if v["type"] == "change" {
            got.push(v);
        }
    }
    assert_eq!(got[0]["new"]["id"], 50);
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(fake.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!buf.starts_with(b"HTTP/"), "plain HTTP is not served on a TLS listener");
    assert!(
        metric_tls(
            &certs,
            fake.addr,
            "changerelay_endpoint_refusals_total{reason=\"tls_handshake\"}"
        ) >= 1
    );
}

fn metric_tls(certs: &Certs, addr: std::net::SocketAddr, name: &str) -> u64 {
    let mut s = tls_connect(certs, addr);
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", addr.port()).as_bytes())
        .unwrap();
    let body = read_response(&mut s).body;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn bad_tls_files_fail_start_clearly() {
    let certs = Certs::new("bad");
    let start = |files: TlsFiles| {
        let cfg = Config {
            tls: Some(files),
            ..test_config(Auth::Token)
        };
        changerelay_endpoint::start(cfg).err().expect("refused")
    };
    let e = start(certs.files("missing.pem", "key.pem"));
    assert!(
        e.contains("certificate") && e.contains("missing.pem") && e.contains("No such file"),
        "{e}"
    );
    let e = start(certs.files("garbage.pem", "key.pem"));
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let e = start(certs.files("cert.pem", "garbage.pem"));
    assert!(e.contains("holds no PEM private key"), "{e}");
    let e = start(certs.files("cert.pem", "other-key.pem"));
    assert!(e.contains("does not match"), "{e}");
}

#[test]
fn token_auth_on_the_network_needs_tls_or_an_explicit_flag() {
    let mut cfg = test_config(Auth::Token);
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap(), "192.0.2.1:0".parse().unwrap()];
    let e = changerelay_endpoint::start(cfg.clone()).err().expect("refused");
    assert!(e.contains("without TLS"), "{e}");
    cfg.allow_plain_token_auth_on_network = true;
    // Allowed now: start gets past the check and fails binding (192.0.2.1 is a documentation address that
    // is not on this machine; nothing is sent anywhere).
    cfg.listen = vec!["192.0.2.1:0".parse().unwrap()];
    let e = changerelay_endpoint::start(cfg).err().expect("cannot bind");
    assert!(e.contains("could not listen on 192.0.2.1:0"), "{e}");
    let mut trust = test_config(Auth::Trust);
    trust.listen = vec!["192.0.2.1:0".parse().unwrap()];
    let e = changerelay_endpoint::start(trust).err().expect("refused");
    assert!(e.contains("trust authentication is refused"), "{e}");
}
