//! What the operator and the agent share as daemons: the one way they (and
//! the tests) reach the API server (a kubeconfig file when one is named,
//! else the in-cluster ServiceAccount, else the default kubeconfig), and
//! stopping on request.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The client configuration from `kubeconfig`, else from what
/// `kube::Config::infer` finds (the in-cluster ServiceAccount, then
/// `$KUBECONFIG` or `~/.kube/config`). The error names the file or the
/// source that failed.
pub async fn api_config(kubeconfig: Option<&Path>) -> Result<kube::Config, String> {
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("loading kubeconfig {}: {e}", path.display()))
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("finding a kubeconfig or in-cluster config: {e}")),
    }
}

/// A client for [`api_config`]'s configuration.
pub async fn api_client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let config = api_config(kubeconfig).await?;
    kube::Client::try_from(config).map_err(|e| format!("building the Kubernetes client: {e}"))
}

/// Resolves when SIGTERM (launchd, systemd, the kubelet, the agent stopping
/// a worker) or SIGINT arrives, saying which in the log.
pub async fn termination() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("SIGINT: shutting down");
}
