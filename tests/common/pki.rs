//! Certificates for TLS tests and the benchmark: a CA, a server
//! certificate for 127.0.0.1 and localhost, a client certificate, and a
//! second CA with its own client certificate (trusted by nobody).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// PEM files in a folder.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA the server does not trust, and a client certificate it signed.
    pub other_ca: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (params, KeyPair::generate().expect("CA key"))
}

/// Writes a certificate for `names`, signed by `issuer`, and its key.
fn leaf(
    dir: &Path,
    file: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    let (c, k) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}

impl Pki {
    /// Makes everything in `dir`.
    pub fn make(dir: &Path) -> Pki {
        let (params, key) = ca("Tally test CA");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, params.self_signed(&key).expect("self-sign").pem()).expect("write CA");
        let issuer = Issuer::new(params, key);
        let (server_cert, server_key) =
            leaf(dir, "server", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, &issuer);
        let (client_cert, client_key) = leaf(dir, "client", &["client"], ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        let (params, key) = ca("Another CA");
        let other_ca = dir.join("other-ca.pem");
        std::fs::write(&other_ca, params.self_signed(&key).expect("self-sign").pem()).expect("write CA");
        let other = Issuer::new(params, key);
        let (other_client_cert, other_client_key) =
            leaf(dir, "other-client", &["intruder"], ExtendedKeyUsagePurpose::ClientAuth, &other);
        Pki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
            other_ca,
            other_client_cert,
            other_client_key,
        }
    }
}
