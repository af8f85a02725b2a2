//! Reading the Secrets a shard names: its group token, rank 0's API-key
//! digest and the TLS material, waiting (as `Pending`) while one is missing.

use super::*;

/// What reading a Secret gave.
pub(super) enum SecretRead {
    /// The key's value.
    Value(String),
    /// Not there (yet), or the API server could not be asked: try again.
    Wait(String),
    /// There, but unusable.
    Invalid(String),
}

/// Reads one key of a Secret in the shard's namespace.
pub(super) async fn read_secret(
    client: &kube::Client,
    namespace: &str,
    reference: &SecretKeyRef,
    default_key: &str,
) -> SecretRead {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let key = reference.key.as_deref().unwrap_or(default_key);
    let secret = match api.get_opt(&reference.name).await {
        Ok(Some(s)) => s,
        Ok(None) => return SecretRead::Wait(format!("waiting for Secret {}", reference.name)),
        Err(e) => {
            return SecretRead::Wait(format!(
                "reading Secret {} failed ({e}); retrying",
                reference.name
            ));
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes().to_vec())
        });
    let Some(value) = value else {
        return SecretRead::Invalid(format!("Secret {} has no key `{key}`", reference.name));
    };
    match String::from_utf8(value) {
        Ok(text) if !text.trim().is_empty() => SecretRead::Value(text.trim().to_owned()),
        Ok(_) => SecretRead::Invalid(format!("Secret {} key `{key}` is empty", reference.name)),
        Err(_) => SecretRead::Invalid(format!(
            "Secret {} key `{key}` is not UTF-8",
            reference.name
        )),
    }
}

/// Reads a Secret, waiting (as `Pending`) while it is missing.
pub(super) async fn wait_secret(
    tracked: &mut Tracked,
    reference: &SecretKeyRef,
    default_key: &str,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Result<String, Attempt> {
    let client = tracked.ctx.client.clone();
    let namespace = tracked.shard.namespace().unwrap_or_default();
    loop {
        match read_secret(&client, &namespace, reference, default_key).await {
            SecretRead::Value(v) => return Ok(v),
            SecretRead::Invalid(message) => {
                return Err(Attempt::fail(FailureReason::InvalidShard, message));
            }
            SecretRead::Wait(message) => {
                if tracked.state.message.as_deref() != Some(&message) {
                    tracked.phase(ShardPhase::Pending, message).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    a = interrupted(stop, updates) => return Err(a),
                }
            }
        }
    }
}

/// Reads the shard's TLS Secret (`tls.crt`, `tls.key`, `ca.crt`), waiting
/// (as `Pending`) while it is missing; material that does not parse, or a
/// key that is not the certificate's, fails the shard as `InvalidShard`.
pub(super) async fn wait_tls(
    tracked: &mut Tracked,
    reference: &SecretRef,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Result<TlsMaterial, Attempt> {
    let mut pem = Vec::with_capacity(3);
    for key in [TLS_CERT_KEY, TLS_KEY_KEY, TLS_CA_KEY] {
        let field = SecretKeyRef {
            name: reference.name.clone(),
            key: Some(key.to_owned()),
        };
        pem.push(wait_secret(tracked, &field, key, stop, updates).await?);
    }
    let [cert, key, ca]: [String; 3] = pem.try_into().map_err(|_| {
        Attempt::fail(
            FailureReason::InvalidShard,
            "reading the TLS Secret".to_owned(),
        )
    })?;
    TlsMaterial::new(cert, key, ca).map_err(|e| {
        Attempt::fail(
            FailureReason::InvalidShard,
            format!("TLS Secret {}: {e}", reference.name),
        )
    })
}
