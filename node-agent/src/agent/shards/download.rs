//! Downloading a shard's model, with byte progress in its status.

use super::*;

/// Downloads the shard's model, writing byte progress about once a second.
/// Shards of the same model on this node share one transfer. Network
/// failures are retried inside the download (the message says so; the
/// phase stays `Downloading`); a disk too small fails the shard with
/// `InsufficientDisk` until that much space is free, then tries again.
pub(super) async fn download(
    tracked: &mut Tracked,
    revision: &str,
    stop: &mut watch::Receiver<Option<String>>,
    updates: &mut watch::Receiver<Arc<LlamaShard>>,
) -> Result<PathBuf, Attempt> {
    let ctx = tracked.ctx.clone();
    let model = tracked.shard.spec.model.clone();
    let dest = ctx.config.download_dir.clone();
    let downloading = format!("downloading {model}@{revision} from {}", models::endpoint());
    loop {
        let mut transfer = Download::start(&model, revision, &dest);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = (u64::MAX, 0, None);
        let result = loop {
            tokio::select! {
                done = transfer.finish() => break done,
                _ = tick.tick() => {
                    let (done, total) = transfer.progress();
                    let note = transfer.note();
                    if (done, total, note.as_ref()) != (last.0, last.1, last.2.as_ref()) {
                        let mut state = tracked.state.clone();
                        state.phase = ShardPhase::Downloading;
                        state.reason = None;
                        state.message = Some(note.clone().unwrap_or_else(|| downloading.clone()));
                        state.progress = Some(Progress {
                            bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
                            bytes_total: (total > 0).then(|| i64::try_from(total).unwrap_or(i64::MAX)),
                        });
                        last = (done, total, note);
                        tracked.set(state).await;
                    }
                }
                a = interrupted(stop, updates) => return Err(a),
            }
        };
        let e = match result {
            Ok(dir) => {
                let (done, total) = transfer.progress();
                let mut state = tracked.state.clone();
                state.progress = Some(Progress {
                    bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
                    bytes_total: Some(i64::try_from(total.max(done)).unwrap_or(i64::MAX)),
                });
                state.message = Some(format!("downloaded {model} to {}", dir.display()));
                tracked.set(state).await;
                return Ok(dir);
            }
            Err(e) => e,
        };
        let reason = match &e {
            models::DownloadError::Corrupt { .. } => FailureReason::CorruptModel,
            models::DownloadError::InsufficientDisk { .. } => FailureReason::InsufficientDisk,
            _ => FailureReason::ModelNotFound,
        };
        let models::DownloadError::InsufficientDisk { needed, dir, .. } = &e else {
            return Err(Attempt::Failed {
                reason,
                retry: e.is_transient(),
                message: e.to_string(),
                ready_for: None,
            });
        };
        // Waiting cures nothing until space is freed; look every few seconds.
        tracked
            .failed(
                reason,
                format!("{e}; the download starts again once that much is free"),
            )
            .await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                a = interrupted(stop, updates) => return Err(a),
            }
            if models::free_bytes(dir).is_ok_and(|free| free >= *needed) {
                break;
            }
        }
        tracked
            .phase(ShardPhase::Downloading, downloading.clone())
            .await;
    }
}
