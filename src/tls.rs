//! TLS for both ends, with rustls: the server's listener config (a
//! certificate and key from PEM files, optionally a CA its clients'
//! certificates must chain to) and the client's (a CA file or the system's
//! roots, optionally a client certificate).
//!
//! Only rustls's safe defaults are offered: TLS 1.2 and 1.3 with forward
//! secrecy and AEAD ciphers, through the `ring` provider. Inside TLS the
//! protocol is byte for byte the plaintext one (binary frames or text
//! lines), so every client and tool works over either.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// A TLS setting that cannot be used: the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError(format!("{}: no usable private key: {e}", path.display())))
}

/// Trust anchors from a PEM file of CA certificates.
fn roots_from(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError(format!("{}: not a usable CA certificate: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The server's TLS config from `[tls]`: `cert` and `key`, and with
/// `client_ca` every client must present a certificate that chains to it.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Err(TlsError("tls.listen needs tls.cert and tls.key".into()));
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(ca)?), provider())
                .build()
                .map_err(|e| TlsError(format!("tls.client_ca: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError(format!("tls.cert and tls.key do not make a usable pair: {e}")))?;
    Ok(Arc::new(config))
}

/// How a client decides whom to trust, and what it shows.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// A PEM file of the CA certificates to trust; `None`: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// A certificate and key to present (for a server with `client_ca`).
    pub cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl ClientTls {
    /// The client's TLS config.
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = match &self.ca {
            Some(ca) => roots_from(ca)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError("no system CA certificates found; pass a CA file".into()));
                }
                roots
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(roots);
        let config = match &self.cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| TlsError(format!("the client certificate and key: {e}")))?,
        };
        Ok(Arc::new(config))
    }
}

/// The name a server's certificate must carry: the host part of
/// `host:port` (a DNS name or an IP address).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError(format!("{host:?} is not a host name or address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(server_name("localhost:7708").unwrap(), ServerName::try_from("localhost").unwrap());
        assert_eq!(server_name("127.0.0.1:7708").unwrap(), ServerName::try_from("127.0.0.1").unwrap());
        assert_eq!(server_name("[::1]:7708").unwrap(), ServerName::try_from("::1").unwrap());
        assert_eq!(server_name("tally.example.org").unwrap(), ServerName::try_from("tally.example.org").unwrap());
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = load_certs(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.pem: no certificate"), "{e}");
        let e = load_key(&dir.path().join("absent.pem")).unwrap_err().to_string();
        assert!(e.contains("absent.pem: no usable private key"), "{e}");
    }
}
