//! Certificates generated at test time: a CA, a server certificate for `127.0.0.1` and `localhost`,
//! a client certificate, and a second, unrelated CA whose certificates nobody should trust.
//!
//! Nothing is checked in: every test run makes fresh keys in a temporary directory, removed when
//! [`Certs`] is dropped.

use std::{fs, net::Ipv4Addr, path::PathBuf};

use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tempfile::TempDir;

use crate::etcd::ServerTls;

/// PEM files in a temporary directory.
#[derive(Debug)]
pub struct Certs {
    _dir: TempDir,
    /// The CA that signed `server_cert` and `client_cert`.
    pub ca: PathBuf,
    /// A server certificate valid for `127.0.0.1`, `::1` and `localhost` (also usable as a client
    /// certificate, as etcd's members need).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (CN `client`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, which signed nothing of the above.
    pub other_ca: PathBuf,
    /// A server certificate for `127.0.0.1` signed by `other_ca`: untrusted by anyone trusting `ca`.
    pub rogue_cert: PathBuf,
    /// Its key.
    pub rogue_key: PathBuf,
}

impl Certs {
    /// Generates a fresh set.
    ///
    /// # Panics
    ///
    /// Panics if key generation or writing a file fails.
    pub fn generate() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("testkit-certs-")
            .tempdir()
            .unwrap_or_else(|e| panic!("testkit: cannot create a temporary directory: {e}"));
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            fs::write(&path, pem)
                .unwrap_or_else(|e| panic!("testkit: cannot write {}: {e}", path.display()));
            path
        };
        let (ca, ca_pem) = authority("testkit CA");
        let (other, other_pem) = authority("testkit other CA");
        // etcd's gateway dials its own members with the server certificate: it needs both usages.
        let (server_cert, server_key) = leaf(&ca, "server", &[ServerAuth, ClientAuth]);
        let (client_cert, client_key) = leaf(&ca, "client", &[ClientAuth]);
        let (rogue_cert, rogue_key) = leaf(&other, "rogue", &[ServerAuth, ClientAuth]);
        Certs {
            ca: write("ca.pem", ca_pem),
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            other_ca: write("other-ca.pem", other_pem),
            rogue_cert: write("rogue.pem", rogue_cert),
            rogue_key: write("rogue-key.pem", rogue_key),
            _dir: dir,
        }
    }

    /// The etcd server side of these certificates, for [`crate::EtcdCluster::builder`].
    pub fn etcd_server(&self, client_cert_auth: bool) -> ServerTls {
        ServerTls {
            ca: self.ca.clone(),
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_cert_auth,
        }
    }
}

type Issuer = CertifiedIssuer<'static, KeyPair>;

fn authority(name: &str) -> (Issuer, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("testkit: generating a CA key");
    let issuer = CertifiedIssuer::self_signed(params, key).expect("testkit: self-signing a CA");
    let pem = issuer.pem();
    (issuer, pem)
}

fn leaf(issuer: &Issuer, name: &str, usages: &[ExtendedKeyUsagePurpose]) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("testkit: localhost is a valid DNS name");
    params
        .subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate().expect("testkit: generating a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("testkit: signing a certificate");
    (cert.pem(), key.serialize_pem())
}
