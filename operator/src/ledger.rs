//! What this operator process wrote recently, layered over the watch caches.
//!
//! Reflector stores lag behind the writes that the operator itself makes. A
//! reconcile that runs right after shards were written (triggered by the
//! first shard's watch event, say) could otherwise see half of a new epoch,
//! or none of it, and start yet another epoch; and two deployments planned a
//! moment apart could both count the same free memory. So the ledger keeps:
//! - the shards written by this process until the store shows them;
//! - the shards deleted by this process, so they are not deleted again;
//! - the epoch of the group token minted last per deployment;
//! - the last status written per deployment: the operator is the only writer
//!   of status (leader election sees to that), so its own last write is
//!   never older than the store's copy.
//!
//! Entries expire after a while, so a write that the store never shows (the
//! object was deleted at once) cannot stay counted forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use tandem_crds::{LlamaDeploymentStatus, LlamaShard};

/// How long a written or deleted shard is remembered without the store
/// catching up.
const TTL: Duration = Duration::from_secs(60);

type Key = (String, String);

fn key(shard: &LlamaShard) -> Key {
    (shard.namespace().unwrap_or_default(), shard.name_any())
}

#[derive(Debug, Default)]
struct Inner {
    written: HashMap<Key, (Arc<LlamaShard>, Instant)>,
    deleted: HashMap<Key, Instant>,
    statuses: HashMap<String, (LlamaDeploymentStatus, Instant)>,
    tokens: HashMap<String, (i64, Instant)>,
}

/// The operator's memory of its own recent writes; see the module docs.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind, which are
        // still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers shards just written.
    pub fn record_written(&self, shards: &[LlamaShard], at: Instant) {
        let mut inner = self.lock();
        for s in shards {
            inner.written.insert(key(s), (Arc::new(s.clone()), at));
        }
    }

    /// Forgets shards whose write failed.
    pub fn forget_written(&self, shards: &[LlamaShard]) {
        let mut inner = self.lock();
        for s in shards {
            inner.written.remove(&key(s));
        }
    }

    /// Remembers a shard just deleted.
    pub fn record_deleted(&self, namespace: &str, name: &str, at: Instant) {
        let k = (namespace.to_owned(), name.to_owned());
        let mut inner = self.lock();
        inner.written.remove(&k);
        inner.deleted.insert(k, at);
    }

    /// Whether this process deleted the shard less than a TTL ago.
    pub fn recently_deleted(&self, namespace: &str, name: &str, now: Instant) -> bool {
        self.lock()
            .deleted
            .get(&(namespace.to_owned(), name.to_owned()))
            .is_some_and(|at| now.duration_since(*at) < TTL)
    }

    /// The store's shards plus the shards written here that the store does
    /// not show yet. Prunes entries the store has caught up with, and expired ones.
    pub fn merge(&self, store: Vec<Arc<LlamaShard>>, now: Instant) -> Vec<Arc<LlamaShard>> {
        let mut inner = self.lock();
        let mut seen = std::collections::HashSet::with_capacity(store.len());
        for s in &store {
            seen.insert(key(s));
        }
        inner
            .written
            .retain(|k, (_, at)| !seen.contains(k) && now.duration_since(*at) < TTL);
        inner.deleted.retain(|_, at| now.duration_since(*at) < TTL);
        let mut out = store;
        out.extend(inner.written.values().map(|(s, _)| Arc::clone(s)));
        out
    }

    /// The last status written for the deployment with this uid.
    pub fn status(&self, uid: &str) -> Option<LlamaDeploymentStatus> {
        self.lock().statuses.get(uid).map(|(s, _)| s.clone())
    }

    /// Remembers the status just written.
    pub fn set_status(&self, uid: &str, status: LlamaDeploymentStatus, at: Instant) {
        self.lock().statuses.insert(uid.to_owned(), (status, at));
    }

    /// Whether this process wrote the deployment's status less than a TTL
    /// ago: until then a cache that shows an older status is only lagging.
    pub fn status_fresh(&self, uid: &str, now: Instant) -> bool {
        self.lock()
            .statuses
            .get(uid)
            .is_some_and(|(_, at)| now.duration_since(*at) < TTL)
    }

    /// Forgets a deployment that is gone.
    pub fn forget_status(&self, uid: &str) {
        let mut inner = self.lock();
        inner.statuses.remove(uid);
        inner.tokens.remove(uid);
    }

    /// Remembers that the deployment's group token was minted for `epoch`.
    pub fn record_token(&self, uid: &str, epoch: i64, at: Instant) {
        self.lock().tokens.insert(uid.to_owned(), (epoch, at));
    }

    /// Whether this process minted the deployment's token for `epoch` less
    /// than a TTL ago (after that, the Secret cache is trusted again).
    pub fn token_written(&self, uid: &str, epoch: i64, now: Instant) -> bool {
        self.lock()
            .tokens
            .get(uid)
            .is_some_and(|(e, at)| *e == epoch && now.duration_since(*at) < TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::shard;

    #[test]
    fn written_shards_show_until_the_store_has_them() {
        let ledger = Ledger::default();
        let t0 = Instant::now();
        let a = shard("d", "n1", "10.0.0.1:47000", 0, 2);
        let b = shard("d", "n2", "10.0.0.2:47000", 1, 2);
        ledger.record_written(&[a.clone(), b.clone()], t0);
        // The store has seen only `a`.
        let merged = ledger.merge(vec![Arc::new(a.clone())], t0);
        assert_eq!(merged.len(), 2);
        // Now it has both: the ledger empties.
        let merged = ledger.merge(vec![Arc::new(a.clone()), Arc::new(b.clone())], t0);
        assert_eq!(merged.len(), 2);
        assert_eq!(ledger.merge(vec![], t0).len(), 0);
    }

    #[test]
    fn entries_expire_and_failed_writes_are_forgotten() {
        let ledger = Ledger::default();
        let t0 = Instant::now();
        let a = shard("d", "n1", "10.0.0.1:47000", 0, 1);
        ledger.record_written(std::slice::from_ref(&a), t0);
        assert_eq!(ledger.merge(vec![], t0 + Duration::from_secs(61)).len(), 0);
        ledger.record_written(std::slice::from_ref(&a), t0);
        ledger.forget_written(std::slice::from_ref(&a));
        assert_eq!(ledger.merge(vec![], t0).len(), 0);
        ledger.record_deleted("ns", "x", t0);
        assert!(ledger.recently_deleted("ns", "x", t0 + Duration::from_secs(1)));
        assert!(!ledger.recently_deleted("ns", "x", t0 + Duration::from_secs(61)));
        assert!(!ledger.recently_deleted("ns", "y", t0));
    }

    #[test]
    fn statuses_are_kept_per_uid() {
        let ledger = Ledger::default();
        let s = LlamaDeploymentStatus {
            epoch: 3,
            ..Default::default()
        };
        let t0 = Instant::now();
        ledger.set_status("u1", s.clone(), t0);
        assert_eq!(ledger.status("u1"), Some(s));
        assert!(ledger.status_fresh("u1", t0));
        assert!(!ledger.status_fresh("u1", t0 + TTL));
        ledger.record_token("u1", 3, t0);
        assert!(ledger.token_written("u1", 3, t0));
        assert!(!ledger.token_written("u1", 4, t0));
        assert!(!ledger.token_written("u1", 3, t0 + TTL));
        ledger.forget_status("u1");
        assert_eq!(ledger.status("u1"), None);
        assert!(!ledger.token_written("u1", 3, t0));
    }
}
