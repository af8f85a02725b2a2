//! Stopping on request: the agent, `serve` and every rank worker end on
//! SIGTERM (launchd, systemd, the agent stopping a worker) and SIGINT.

/// Resolves when SIGTERM or SIGINT arrives.
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
}
