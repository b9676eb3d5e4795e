//! TLS material from PEM files, for the three places this crate speaks TLS: to etcd, from a client to
//! instances (the [`crate::BalancedChannel`]), and in a server accepting those calls.
//!
//! Files are read and checked once, when the configuration is built, so a missing file or a key given
//! without its certificate is reported at startup, naming the file, instead of as a handshake failure
//! minutes later. The key's contents never appear in `Debug` output, logs or errors: only its path.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio_rustls::{TlsConnector, rustls};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// Where the PEM files of one side of a TLS connection are. All optional; which are needed depends
/// on the side: a client needs `ca` (to trust the server) and, for mutual TLS, `cert` + `key`; a
/// server needs `cert` + `key` and, to require client certificates, `ca`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) to trust, PEM.
    pub ca: Option<PathBuf>,
    /// Our certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// The private key of `cert`, PEM.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// True when no file is set: TLS is off.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Reads and checks the files.
    ///
    /// # Errors
    /// [`Error::TlsFile`] naming a file that cannot be read or holds no PEM block of the expected
    /// kind; [`Error::InvalidTls`] for a certificate without its key or the other way round.
    pub fn load(&self) -> Result<Tls> {
        let ca = self
            .ca
            .as_deref()
            .map(|path| read_pem(path, "CA certificate", "CERTIFICATE"))
            .transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(Pem {
                cert: read_pem(cert, "certificate", "CERTIFICATE")?,
                key: read_pem(key, "private key", "PRIVATE KEY")?,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::InvalidTls {
                    reason: "a certificate was given without its private key (set both, or neither)",
                });
            }
            (None, Some(_)) => {
                return Err(Error::InvalidTls {
                    reason: "a private key was given without its certificate (set both, or neither)",
                });
            }
        };
        Ok(Tls {
            files: self.clone(),
            ca: ca.map(Arc::from),
            identity: identity.map(Arc::new),
        })
    }
}

/// Loaded TLS material, ready to configure a connection. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    /// The CA certificates, PEM.
    ca: Option<Arc<[u8]>>,
    identity: Option<Arc<Pem>>,
}

/// A certificate chain and its private key, PEM.
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: never the key material.
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// True when a client certificate is presented (mutual TLS).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// Client-side settings: trust `ca` (or, without one, the system's roots are *not* used: a
    /// server certificate must then chain to a CA given here), present `cert` + `key` if set.
    /// `domain` overrides the name the server's certificate is checked against (default: the host
    /// being dialled, which for `10.0.0.5:50051` means an IP address in the certificate).
    pub fn client_config(&self, domain: Option<&str>) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some(identity) = self.identity() {
            config = config.identity(identity);
        }
        if let Some(domain) = domain {
            config = config.domain_name(domain);
        }
        config
    }

    /// Client-side settings for the [`crate::BalancedChannel`]'s connections to instances, with
    /// the same trust as [`Tls::client_config`]: `ca` only, and `cert` + `key` if set. `domain`
    /// overrides the name each instance's certificate is checked against (default: the host
    /// being dialled, an IP address for `10.0.0.5:50051`). The channel makes its own HTTP/2
    /// connections, so this is a rustls configuration rather than tonic's.
    ///
    /// # Errors
    /// [`Error::InvalidTls`] without a CA certificate (an instance could not be trusted), and
    /// [`Error::TlsFile`] naming a file whose certificate or key rustls does not accept, or a
    /// `domain` that is not a host name.
    pub fn balancer_config(&self, domain: Option<&str>) -> Result<ClientTls> {
        let ca = self.ca.as_deref().ok_or(Error::InvalidTls {
            reason: "TLS to the instances needs a CA certificate to trust them",
        })?;
        let file = |what: &'static str, path: &Option<PathBuf>, problem: String| Error::TlsFile {
            what,
            path: path.clone().unwrap_or_default(),
            problem,
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca) {
            let added = cert
                .map_err(|e| e.to_string())
                .and_then(|cert| roots.add(cert).map_err(|e| e.to_string()));
            added.map_err(|problem| file("CA certificate", &self.files.ca, problem))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            // Cannot fail with ring, which has every safe version; not the CA file's fault.
            .map_err(|_| Error::InvalidTls {
                reason: "rustls's ring provider offers no safe TLS version",
            })?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                let chain = CertificateDer::pem_slice_iter(&identity.cert)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| file("certificate", &self.files.cert, e.to_string()))?;
                let key = PrivateKeyDer::from_pem_slice(&identity.key)
                    .map_err(|e| file("private key", &self.files.key, e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| file("private key", &self.files.key, e.to_string()))?
            }
        };
        // gRPC is HTTP/2 only, and servers may insist on ALPN saying so (grpc-go does).
        config.alpn_protocols = vec![b"h2".to_vec()];
        let domain = domain
            .map(|name| {
                ServerName::try_from(name.to_owned()).map_err(|_| Error::InvalidTls {
                    reason: "the TLS domain name is not a valid host name",
                })
            })
            .transpose()?;
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            domain,
        })
    }

    /// The certificate and key as tonic's type.
    fn identity(&self) -> Option<Identity> {
        let pem = self.identity.as_deref()?;
        Some(Identity::from_pem(&pem.cert, &pem.key))
    }

    /// Server-side settings: present `cert` + `key`; when `ca` is set, require every client to
    /// present a certificate signed by it (mutual TLS).
    ///
    /// # Errors
    /// [`Error::InvalidTls`] if no certificate and key are configured.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        let identity = self.identity().ok_or(Error::InvalidTls {
            reason: "a TLS server needs a certificate and its private key",
        })?;
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

/// TLS for the balanced channel's connections: see [`Tls::balancer_config`]. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    /// The name certificates are checked against, when not the host dialled.
    domain: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Runs the TLS handshake on `stream` to the instance at `host`.
    pub(crate) async fn connect<S>(
        &self,
        host: &str,
        stream: S,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = match &self.domain {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_owned()).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{host} is not a name a TLS certificate can be checked against"),
                )
            })?,
        };
        self.connector.connect(name, stream).await
    }
}

/// Reads a PEM file and checks it holds at least one block whose label ends with `label` (so
/// `PRIVATE KEY` accepts PKCS#8, RSA and EC keys).
fn read_pem(path: &Path, what: &'static str, label: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| Error::TlsFile {
        what,
        path: path.to_owned(),
        problem: source.to_string(),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|found| found.ends_with(label))
    });
    if !has_block {
        return Err(Error::TlsFile {
            what,
            path: path.to_owned(),
            problem: format!("no PEM block \"{label}\" in it; is it the right file?"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = write(
            dir.path(),
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        );
        let key = write(
            dir.path(),
            "k.pem",
            "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n",
        );
        let loaded = TlsFiles {
            ca: Some(cert.clone()),
            cert: Some(cert.clone()),
            key: Some(key.clone()),
        }
        .load()
        .unwrap();
        assert!(loaded.has_identity());
        assert!(!format!("{loaded:?}").contains("AA=="));

        let swapped = TlsFiles {
            ca: Some(key.clone()),
            ..TlsFiles::default()
        };
        let err = swapped.load().unwrap_err().to_string();
        assert!(
            err.contains("k.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );

        let missing = TlsFiles {
            ca: Some(dir.path().join("nope.pem")),
            ..TlsFiles::default()
        };
        assert!(missing.load().unwrap_err().to_string().contains("nope.pem"));

        let half = TlsFiles {
            cert: Some(cert),
            ..TlsFiles::default()
        };
        assert!(matches!(half.load(), Err(Error::InvalidTls { .. })));
    }

    #[test]
    fn the_balancer_config_needs_a_ca_and_names_a_file_rustls_refuses() {
        let dir = tempfile::tempdir().unwrap();
        // A PEM block whose contents are no certificate: loading accepts it (it only looks for
        // the block), building the rustls configuration does not.
        let ca = write(
            dir.path(),
            "ca.pem",
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        );
        let no_ca = TlsFiles::default().load().unwrap();
        assert!(matches!(
            no_ca.balancer_config(None),
            Err(Error::InvalidTls { .. })
        ));
        let bogus = TlsFiles {
            ca: Some(ca),
            ..TlsFiles::default()
        }
        .load()
        .unwrap();
        let err = bogus.balancer_config(None).unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
    }
}
