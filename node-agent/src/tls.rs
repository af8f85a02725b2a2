//! TLS for rank 0's API and the group's control stream: the PEM a shard's
//! TLS Secret holds (`tls.crt`, `tls.key`, `ca.crt`), checked once and
//! turned into the rustls configuration of the HTTP accept loop and the
//! tonic configurations of the control server and its clients.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// A certificate, its key and the CA that issued it, as PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMaterial {
    /// The certificate chain rank 0 presents, leaf first.
    pub cert_pem: String,
    /// The certificate's private key.
    pub key_pem: String,
    /// The CA the other ranks verify rank 0 against.
    pub ca_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"..")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .finish()
    }
}

/// Why TLS material is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM field holds nothing of the kind it should.
    #[error("{what} holds no PEM {kind}")]
    Missing {
        /// Which field (`tls.crt`, `tls.key`, `ca.crt`).
        what: &'static str,
        /// What was looked for.
        kind: &'static str,
    },
    /// A PEM field does not parse.
    #[error("{what} is not valid PEM: {message}")]
    Pem {
        /// Which field.
        what: &'static str,
        /// The parser's complaint.
        message: String,
    },
    /// rustls refused the certificate and key (they do not match, say).
    #[error("the certificate and key are unusable: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsMaterial {
    /// Material from PEM text, checked: the chain, the key and the CA all
    /// parse, and the key belongs to the certificate.
    pub fn new(
        cert_pem: impl Into<String>,
        key_pem: impl Into<String>,
        ca_pem: impl Into<String>,
    ) -> Result<TlsMaterial, TlsError> {
        let material = TlsMaterial {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            ca_pem: ca_pem.into(),
        };
        material.http_server_config()?;
        certificates(&material.ca_pem, "ca.crt")?;
        Ok(material)
    }

    /// The configuration of rank 0's HTTPS accept loop (HTTP/1.1 only, as
    /// the plain server).
    pub fn http_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = certificates(&self.cert_pem, "tls.crt")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
                what: "tls.key",
                kind: "private key",
            },
            e => TlsError::Pem {
                what: "tls.key",
                message: e.to_string(),
            },
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The control server's TLS: this certificate, each handshake bounded
    /// by `handshake_timeout`.
    pub fn control_server_config(
        &self,
        handshake_timeout: std::time::Duration,
    ) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(handshake_timeout)
    }

    /// A control client's TLS: rank 0 must present a certificate the CA
    /// issued for the address the client dials.
    pub fn control_client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }
}

fn certificates(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Missing {
            what,
            kind: "certificate",
        });
    }
    Ok(chain)
}

/// A fresh CA and a certificate it issued for 127.0.0.1, as
/// (`tls.crt`, `tls.key`, `ca.crt`), for tests.
#[cfg(test)]
pub(crate) fn issued() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    (cert.pem(), key.serialize_pem(), ca.pem())
}

/// [`issued`] as checked material.
#[cfg(test)]
pub(crate) fn test_material() -> TlsMaterial {
    let (cert, key, ca) = issued();
    TlsMaterial::new(cert, key, ca).expect("usable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_material_is_accepted_and_the_key_stays_out_of_debug() {
        let (cert, key, ca) = issued();
        let material = TlsMaterial::new(cert, key.clone(), ca).expect("usable");
        let shown = format!("{material:?}");
        assert!(!shown.contains(key.trim()), "{shown}");
        assert!(material.http_server_config().is_ok());
    }

    #[test]
    fn each_unusable_field_is_named() {
        let (cert, key, ca) = issued();
        let (_, other_key, _) = issued();
        let e = TlsMaterial::new("", key.clone(), ca.clone()).expect_err("no cert");
        assert_eq!(e.to_string(), "tls.crt holds no PEM certificate");
        let e = TlsMaterial::new(cert.clone(), "nonsense", ca.clone()).expect_err("no key");
        assert_eq!(e.to_string(), "tls.key holds no PEM private key");
        let e = TlsMaterial::new(cert.clone(), key, "").expect_err("no ca");
        assert_eq!(e.to_string(), "ca.crt holds no PEM certificate");
        let e = TlsMaterial::new(cert, other_key, ca).expect_err("another key");
        assert!(
            e.to_string()
                .starts_with("the certificate and key are unusable"),
            "{e}"
        );
    }
}
