//! The operator's certificate authority and the serving certificates it
//! issues: one per LlamaDeployment with TLS on and no Secret of the user's
//! own, naming the address of every node its ranks are placed on (rank 0's
//! API and control service may be reached at any of them after a
//! re-placement, and clients reach it at `status.endpoint`).
//!
//! The CA lives in a Secret of the operator's own namespace (`tandem-ca` by
//! default, keys `tls.crt` and `tls.key`), created once by whichever
//! replica gets there first and read by every other. Issuing is pure:
//! [`CertificateAuthority::issue`] takes the addresses and today's date and
//! gives PEM. A serving certificate is valid for [`SERVING_DAYS`] and is
//! issued again [`RENEW_BEFORE_DAYS`] before it expires; the CA is valid for
//! [`CA_DAYS`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Span;
use k8s_openapi::jiff::civil::Date;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tandem_crds::{TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY};

/// Common name of the operator's CA. The issuer of every serving
/// certificate is rebuilt from it, so it never changes.
const CA_COMMON_NAME: &str = "tandem-operator CA";
/// Label on the CA Secret.
const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Days a serving certificate is valid, from the day it is issued.
pub const SERVING_DAYS: i64 = 365;
/// Days before its expiry that a serving certificate is issued again.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// Days the CA is valid (ten years).
pub const CA_DAYS: i64 = 3652;

/// `date` moved by `days`, clamped to the representable range.
fn shift(date: Date, days: i64) -> Date {
    date.checked_add(Span::new().days(days))
        .unwrap_or(if days < 0 { Date::MIN } else { Date::MAX })
}

/// Makes `params` valid from midnight UTC of `from` to midnight UTC of
/// `until`.
fn set_validity(params: &mut CertificateParams, from: Date, until: Date) {
    let midnight = |d: Date| {
        let (month, day) = (
            u8::try_from(d.month()).unwrap_or(1),
            u8::try_from(d.day()).unwrap_or(1),
        );
        rcgen::date_time_ymd(i32::from(d.year()), month, day)
    };
    params.not_before = midnight(from);
    params.not_after = midnight(until);
}

/// Why the CA could not be loaded or a certificate issued.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused: a bad key, a bad address.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The CA Secret exists but lacks a key or holds no PEM.
    #[error("the CA Secret {name} is unusable: {message}")]
    BadCaSecret {
        /// `namespace/name`.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Reading or creating the CA Secret failed.
    #[error("{verb} the CA Secret {name}: {source}")]
    Api {
        /// `read` or `create`.
        verb: &'static str,
        /// `namespace/name`.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// A serving certificate and its key, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, issued by the CA.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// From this day on it is to be issued again.
    pub renew_after: Date,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// The operator's CA: its certificate (published in `status.caBundle` and
/// each TLS Secret's `ca.crt`) and its key.
pub struct CertificateAuthority {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The CA's subject, key usages and key identifier method: the same every
/// time, so an issuer rebuilt from the stored key signs as the stored
/// certificate names it.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    // Validity is left to `generate`: it is not part of the issuer.
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, "tandem");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl CertificateAuthority {
    /// A fresh CA with a new key, valid from the day before `today` (for
    /// clocks behind ours) for [`CA_DAYS`].
    pub fn generate(today: Date) -> Result<CertificateAuthority, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        set_validity(&mut params, shift(today, -1), shift(today, CA_DAYS));
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA from its stored certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, TlsError> {
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            key: KeyPair::from_pem(key_pem)?,
        })
    }

    /// The CA certificate, as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A serving certificate for `deployment` naming every address in
    /// `addresses` (IP subject alternative names), with a new key, valid
    /// from the day before `today` for [`SERVING_DAYS`].
    pub fn issue(
        &self,
        deployment: &str,
        addresses: &[IpAddr],
        today: Date,
    ) -> Result<Issued, TlsError> {
        let issuer = Issuer::new(ca_params(), &self.key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let expires = shift(today, SERVING_DAYS);
        set_validity(&mut params, shift(today, -1), expires);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, deployment);
        params.subject_alt_names = addresses
            .iter()
            .map(|ip| rcgen::SanType::IpAddress(*ip))
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            renew_after: shift(expires, -RENEW_BEFORE_DAYS),
        })
    }

    /// The CA as the Secret that keeps it.
    fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let data = [
            (TLS_CERT_KEY, self.cert_pem.clone()),
            (TLS_KEY_KEY, self.key.serialize_pem()),
        ];
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(
                    [(
                        LABEL_MANAGED_BY.to_owned(),
                        crate::objects::MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    /// The CA from its Secret.
    fn from_secret(secret: &Secret, name: &str) -> Result<CertificateAuthority, TlsError> {
        let field = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .ok_or_else(|| TlsError::BadCaSecret {
                    name: name.to_owned(),
                    message: format!("no UTF-8 key `{key}`"),
                })
        };
        let (cert, key) = (field(TLS_CERT_KEY)?, field(TLS_KEY_KEY)?);
        CertificateAuthority::from_pem(&cert, &key).map_err(|e| TlsError::BadCaSecret {
            name: name.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads the CA from `namespace/name`, creating it first when it is
    /// missing. Creation never overwrites: when another replica created it
    /// in between, its CA is read and used.
    pub async fn load_or_create(
        client: &kube::Client,
        namespace: &str,
        name: &str,
        today: Date,
    ) -> Result<CertificateAuthority, TlsError> {
        let full = format!("{namespace}/{name}");
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let read = |source| TlsError::Api {
            verb: "read",
            name: full.clone(),
            source,
        };
        if let Some(secret) = api.get_opt(name).await.map_err(read)? {
            return CertificateAuthority::from_secret(&secret, &full);
        }
        let fresh = CertificateAuthority::generate(today)?;
        match api
            .create(&PostParams::default(), &fresh.to_secret(namespace, name))
            .await
        {
            Ok(_) => {
                tracing::info!(secret = %full, "created the operator's CA");
                Ok(fresh)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let secret = api.get(name).await.map_err(read)?;
                CertificateAuthority::from_secret(&secret, &full)
            }
            Err(source) => Err(TlsError::Api {
                verb: "create",
                name: full,
                source,
            }),
        }
    }
}

/// What a deployment's TLS Secret holds: the serving certificate and key,
/// and the CA.
pub fn secret_data(issued: &Issued, ca_pem: &str) -> BTreeMap<String, ByteString> {
    [
        (TLS_CERT_KEY, issued.cert_pem.clone()),
        (TLS_KEY_KEY, issued.key_pem.clone()),
        (TLS_CA_KEY, ca_pem.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
    .collect()
}

/// The addresses a deployment's certificate must name: the host of every
/// peer's ring address and of rank 0's control address, sorted, each once.
/// Hosts that are not IP addresses are left out (the shard schema allows
/// IP addresses only).
pub fn certificate_addresses(shard: &tandem_crds::LlamaShardSpec) -> Vec<IpAddr> {
    let hosts = shard
        .peers
        .iter()
        .map(|p| p.address.as_str())
        .chain(std::iter::once(shard.control_address.as_str()));
    let mut ips: Vec<IpAddr> = hosts
        .filter_map(crate::convert::endpoint_host)
        .filter_map(|h| h.trim_start_matches('[').trim_end_matches(']').parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Whether an issued TLS Secret, by its annotations, still fits: its
/// certificate names `addresses` (as [`addresses_annotation`] writes them)
/// and `today` is before its renewal day.
pub fn still_fits(
    annotated_addresses: Option<&str>,
    annotated_renewal: Option<&str>,
    addresses: &str,
    today: Date,
) -> bool {
    let renew_after = annotated_renewal.and_then(|d| d.parse::<Date>().ok());
    annotated_addresses == Some(addresses) && renew_after.is_some_and(|d| today < d)
}

/// The addresses as the TLS Secret's annotation records them, so a change
/// of placement is seen without reading the certificate back.
pub fn addresses_annotation(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> Date {
        text.parse().expect("date")
    }

    #[test]
    fn a_stored_ca_issues_as_the_generated_one_and_names_every_address() {
        let ca = CertificateAuthority::generate(day("2026-12-05")).expect("ca");
        let stored = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key.serialize_pem())
            .expect("stored ca");
        let addresses: Vec<IpAddr> = vec![
            "10.0.0.1".parse().expect("ip"),
            "fd00::2".parse().expect("ip"),
        ];
        let issued = stored
            .issue("llama", &addresses, day("2026-12-05"))
            .expect("issued");
        assert_eq!(issued.renew_after, day("2027-11-05"));
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        // The agent's own check: chain, key and CA parse; the key fits.
        let data = secret_data(&issued, ca.cert_pem());
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            vec![TLS_CA_KEY, TLS_CERT_KEY, TLS_KEY_KEY]
        );
        assert_ne!(
            stored
                .issue("llama", &addresses, day("2026-12-05"))
                .expect("again")
                .key_pem,
            issued.key_pem,
            "every issue has a fresh key"
        );
    }

    #[test]
    fn a_certificate_is_issued_again_for_new_addresses_and_before_it_expires() {
        let today = day("2027-01-10");
        let fits = |addresses, renewal| still_fits(addresses, renewal, "10.0.0.1", today);
        assert!(fits(Some("10.0.0.1"), Some("2027-01-11")));
        assert!(!fits(Some("10.0.0.1"), Some("2027-01-10")), "due today");
        assert!(
            !fits(Some("10.0.0.1,10.0.0.2"), Some("2027-06-01")),
            "moved"
        );
        assert!(!fits(Some("10.0.0.1"), None), "no renewal day");
        assert!(!fits(Some("10.0.0.1"), Some("soon")), "unreadable");
        assert!(!fits(None, Some("2027-06-01")), "not issued here");
    }

    #[test]
    fn certificate_addresses_are_the_placed_hosts_once_each() {
        let shard: tandem_crds::LlamaShardSpec = serde_json::from_value(serde_json::json!({
            "deployment": "d", "epoch": 1, "rank": 0, "worldSize": 3, "nodeName": "a",
            "model": "m",
            "architecture": {"numHiddenLayers": 1, "hiddenSize": 8, "numAttentionHeads": 1,
                             "numKeyValueHeads": 1, "intermediateSize": 8, "vocabSize": 8},
            "peers": [
                {"rank": 0, "node": "a", "address": "10.0.0.2:47000"},
                {"rank": 1, "node": "b", "address": "10.0.0.1:47000"},
                {"rank": 2, "node": "c", "address": "[fd00::1]:47000"}
            ],
            "controlAddress": "10.0.0.2:47001",
            "groupTokenSecretRef": {"name": "t"}
        }))
        .expect("shard");
        let addresses = certificate_addresses(&shard);
        assert_eq!(
            addresses_annotation(&addresses),
            "10.0.0.1,10.0.0.2,fd00::1"
        );
    }
}
