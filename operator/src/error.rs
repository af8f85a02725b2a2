//! Errors of the operator's I/O layer. Each has a [`category`](Error::category),
//! a small fixed set of names used as a metric label and in Event notes.
//! Bad specs are not errors: they are conditions (see [`crate::decide`]).

use thiserror::Error;

/// A reconcile that could not finish.
#[derive(Debug, Error)]
pub enum Error {
    /// An API call failed.
    #[error("failed to {verb} {kind} {name}: {source}")]
    Api {
        /// What was attempted: `apply`, `delete`, `get`, `patch`.
        verb: &'static str,
        /// Kind of the object.
        kind: &'static str,
        /// `namespace/name` of the object.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// An object from the API lacks a field the API server always sets.
    #[error("{kind} {name} has no {field}")]
    MissingField {
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The missing field.
        field: &'static str,
    },
    /// The group-token Secret's name is taken by a Secret the deployment
    /// does not own; the operator will not overwrite it.
    #[error("Secret {name} exists and is not owned by its LlamaDeployment; rename or delete it")]
    ForeignSecret {
        /// `namespace/name` of the Secret.
        name: String,
    },
    /// Deletion is waiting for agents to release shards. Not a failure: the
    /// finalizer helper can only keep its finalizer by seeing an error.
    #[error("waiting for agents to release {count} shards of {name}")]
    ReleasePending {
        /// Deployment being deleted.
        name: String,
        /// Shards left.
        count: usize,
        /// When to look again.
        retry_after: std::time::Duration,
    },
    /// The finalizer helper failed to add or remove the finalizer.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// This process may not write: its leadership lapsed (the renew deadline
    /// plus the drain have passed since its last renewal began, as after a
    /// freeze), or it stepped down. Nothing was written; the leader redoes it.
    #[error("not writing {what} {name}: this replica is not, or may no longer be, the leader")]
    NotLeading {
        /// What was about to be written, such as `LlamaShard` or `Event`.
        what: &'static str,
        /// `namespace/name` of the object.
        name: String,
    },
    /// Issuing a deployment's serving certificate failed.
    #[error("failed to issue the certificate for Secret {name}: {message}")]
    Certificate {
        /// `namespace/name` of the TLS Secret.
        name: String,
        /// What the issuer said.
        message: String,
    },
    /// Serializing an object for server-side apply failed.
    #[error("failed to serialize {what}: {source}")]
    Serialize {
        /// What was serialized.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

/// Every value [`Error::category`] can return.
pub const CATEGORIES: [&str; 12] = [
    "conflict",
    "forbidden",
    "not_found",
    "invalid",
    "unavailable",
    "api",
    "missing_field",
    "release_pending",
    "finalizer",
    "serialize",
    "not_leading",
    "certificate",
];

impl Error {
    /// A bounded label: `conflict`, `forbidden`, `not_found`, `invalid`,
    /// `unavailable`, `api`, `missing_field`, `release_pending`, `finalizer`,
    /// `serialize`, `not_leading` or `certificate`.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Api { source, .. } => api_category(source),
            Error::MissingField { .. } => "missing_field",
            Error::ForeignSecret { .. } => "conflict",
            Error::ReleasePending { .. } => "release_pending",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                kube::runtime::finalizer::Error::AddFinalizer(e)
                | kube::runtime::finalizer::Error::RemoveFinalizer(e) => api_category(e),
                _ => "finalizer",
            },
            Error::Serialize { .. } => "serialize",
            Error::NotLeading { .. } => "not_leading",
            Error::Certificate { .. } => "certificate",
        }
    }

    /// The error the reconcile really hit, through the finalizer wrapper.
    pub fn root(&self) -> &Error {
        match self {
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.root(),
                _ => self,
            },
            other => other,
        }
    }
}

/// The category of a client error, from the API status code where there is one.
pub fn api_category(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(status) => match status.code {
            409 => "conflict",
            401 | 403 => "forbidden",
            404 => "not_found",
            400 | 422 => "invalid",
            429 | 500..=599 => "unavailable",
            _ => "api",
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => "unavailable",
        _ => "api",
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    }

    #[test]
    fn categories_are_bounded_and_see_through_the_finalizer() {
        let cases = [
            (409, "conflict"),
            (403, "forbidden"),
            (404, "not_found"),
            (422, "invalid"),
            (503, "unavailable"),
            (418, "api"),
        ];
        for (_, want) in cases {
            assert!(CATEGORIES.contains(&want), "{want}");
        }
        for (code, want) in cases {
            let e = Error::Api {
                verb: "apply",
                kind: "LlamaShard",
                name: "ns/x".into(),
                source: api(code),
            };
            assert_eq!(e.category(), want);
        }
        let wait = Error::ReleasePending {
            name: "d".into(),
            count: 2,
            retry_after: std::time::Duration::from_secs(1),
        };
        let fenced = Error::NotLeading {
            what: "LlamaShard",
            name: "ns/d-e1-r0".into(),
        };
        assert!(CATEGORIES.contains(&fenced.category()));
        let wrapped: Error = kube::runtime::finalizer::Error::CleanupFailed(wait).into();
        assert_eq!(wrapped.category(), "release_pending");
        assert!(matches!(
            wrapped.root(),
            Error::ReleasePending { count: 2, .. }
        ));
    }
}
