//! A throwaway PKI for the TLS tests: a CA, a server certificate for 127.0.0.1 and
//! localhost, a client certificate (mutual TLS), and a second CA that signed nothing
//! here (the "wrong root").
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct Pki {
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(names: &[&str], cn: &str, issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Writes the PEM files into `dir`; keys are readable by their owner only.
    pub fn write(dir: &Path) -> Pki {
        let (ca_pem, issuer) = ca("herald test CA");
        let (other_pem, _) = ca("some other CA");
        let (server_cert, server_key) = leaf(&["127.0.0.1", "localhost"], "localhost", &issuer);
        let (client_cert, client_key) = leaf(&["herald-node"], "herald-node", &issuer);
        let pki = Pki {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, text) in [
            (&pki.ca, &ca_pem),
            (&pki.other_ca, &other_pem),
            (&pki.server_cert, &server_cert),
            (&pki.server_key, &server_key),
            (&pki.client_cert, &client_cert),
            (&pki.client_key, &client_key),
        ] {
            std::fs::write(path, text).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        for key in [&pki.server_key, &pki.client_key] {
            std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        pki
    }
}
