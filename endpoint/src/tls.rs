//! TLS for the listeners (rustls with the `ring` provider): the certificate chain and key are read once, at
//! [`crate::start`], with errors that say which file is wrong and how.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

fn pem_error(what: &str, path: &Path, e: pem::Error) -> String {
    match e {
        pem::Error::Io(e) => format!("endpoint: TLS {what} file {}: {e}", path.display()),
        pem::Error::NoItemsFound => format!(
            "endpoint: TLS {what} file {} holds no PEM {what} (expected a -----BEGIN ...----- block)",
            path.display()
        ),
        e => format!("endpoint: TLS {what} file {} is not valid PEM: {e}", path.display()),
    }
}

/// Loads the files into an acceptor.
pub(crate) fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_chain)
        .map_err(|e| pem_error("certificate", &files.cert_chain, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error("certificate", &files.cert_chain, e))?;
    if certs.is_empty() {
        return Err(pem_error("certificate", &files.cert_chain, pem::Error::NoItemsFound));
    }
    let key = PrivateKeyDer::from_pem_file(&files.private_key)
        .map_err(|e| pem_error("private key", &files.private_key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("endpoint: TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "endpoint: TLS private key {} does not match the certificate {}",
                files.private_key.display(),
                files.cert_chain.display()
            ),
            e => format!(
                "endpoint: TLS certificate {} or key {} refused: {e}",
                files.cert_chain.display(),
                files.private_key.display()
            ),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
