//! The kube-runtime `Controller` for LlamaDeployments and the I/O ends of the
//! reconcile pipeline: observe (watch caches plus the [`Ledger`]), then the
//! pure [`decide`] step, then apply (Secret, per-node Roles, shards,
//! deletions, one status write, Events).
//!
//! Triggers: the deployments themselves; their shards, group-token Secrets
//! and per-node Roles (owner references); LlamaNodes whose labels, spec, capacity or
//! Ready condition change; and node Leases whose liveness flips (see
//! [`liveness`]). Reconcile waits until the watch caches have listed once,
//! so a restarted operator never mistakes an empty cache for a missing group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::tz::TimeZone;
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use tandem_crds::{
    Backend, LABEL_NODE_ACCESS, LlamaDeployment, LlamaDeploymentStatus, LlamaNode, LlamaShard,
    NodeAccess, node_accesses,
};
use tandem_planner::{NodeInfo, PortRange};
use tokio::sync::{mpsc, watch};

use crate::decide::{self, CleanupInput, Notice, ReconcileInput, Settings, Severity};
use crate::error::Error;
use crate::leader::Fence;
use crate::ledger::Ledger;
use crate::liveness::{self, LeaseWatch, Watched};
use crate::metrics::Metrics;
use crate::objects::{self, FINALIZER, LABEL_GROUP_TOKEN, MANAGER};
use crate::observe::{self, ANNOTATION_PORT_RANGE};
use crate::tls::{self, CertificateAuthority};

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Namespace to watch deployments and shards in; all when `None`.
    pub namespace: Option<String>,
    /// Namespace of node Leases.
    pub lease_namespace: String,
    /// Ports for ranks on nodes without a `tandem.dev/port-range` annotation.
    pub port_range: PortRange,
    /// Decision policy.
    pub settings: Settings,
    /// Node Lease expiry check interval.
    pub liveness_tick: Duration,
    /// Deployments reconciled at once.
    pub concurrency: u16,
    /// This replica's identity, for Events.
    pub identity: String,
    /// The CA that issues deployments' serving certificates.
    pub ca: Arc<CertificateAuthority>,
}

/// What `reconcile` is handed.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event publisher.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Setup.
    pub config: RunConfig,
    /// Watch caches.
    pub stores: Watched,
    /// Recent writes of this process.
    pub ledger: Ledger,
    /// Serializes planning, so two deployments never count the same free
    /// memory or ports. Held only for in-memory work.
    pub placement: Mutex<()>,
    /// When the node Lease watch last listed.
    pub lease_watch: Arc<LeaseWatch>,
    /// Group-token and TLS Secrets, metadata only (the operator never reads
    /// tokens or keys back).
    token_secrets: Store<PartialObjectMeta<Secret>>,
    /// The addresses each deployment's TLS Secret was last issued for by
    /// this process, its renewal day and when, by deployment uid: for a
    /// minute the cache may not show the write yet.
    tls_issued: Mutex<HashMap<String, (String, String, Instant)>>,
    /// The per-node Roles the operator keeps (label `tandem.dev/node-access`).
    node_roles: Store<Role>,
    /// Turns true once the shard, node, Lease, Secret and Role caches have listed.
    caches_ready: watch::Receiver<bool>,
    /// Consecutive failures per deployment, for error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Open while this process may write (see [`Fence`]).
    fence: Fence,
}

// kube's `Recorder` has no `Debug`, so `Context` spells its own.
impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

fn api_error(
    verb: &'static str,
    kind: &'static str,
    ns: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let name = format!("{ns}/{name}");
    move |source| Error::Api {
        verb,
        kind,
        name,
        source,
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether `object` (a shard, a Secret) is controlled by the deployment
/// with `uid`.
fn controlled_by<K: Resource>(object: &K, uid: &str) -> bool {
    object
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

impl Context {
    /// Refuses a write once this process's leadership may have lapsed:
    /// checked right before every API write.
    fn may_write(&self, what: &'static str, ns: &str, name: &str) -> Result<(), Error> {
        if self.fence.allows(Instant::now()) {
            return Ok(());
        }
        tracing::warn!(object = %format!("{ns}/{name}"), what, "not leading (any more): not writing");
        Err(Error::NotLeading {
            what,
            name: format!("{ns}/{name}"),
        })
    }

    async fn wait_for_caches(&self) {
        // A closed channel means the controller is stopping; reconcile then
        // works with what it has, and its writes are about to stop anyway.
        let mut ready = self.caches_ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Every LlamaNode as the planner sees it, with the usage of every
    /// deployment but `(namespace, name)`.
    fn node_view(
        &self,
        shards: &[Arc<LlamaShard>],
        exclude: (&str, &str),
        now: Timestamp,
    ) -> Vec<NodeInfo> {
        let leases = self.stores.leases.state();
        let by_name: BTreeMap<String, &k8s_openapi::api::coordination::v1::Lease> =
            leases.iter().map(|l| (l.name_any(), l.as_ref())).collect();
        let usage = observe::usage_by_node(shards.iter().map(AsRef::as_ref), exclude);
        let nodes = self.stores.nodes.state();
        observe::node_infos(
            nodes.iter().map(AsRef::as_ref),
            &by_name,
            &usage,
            self.config.port_range,
            &self.lease_watch.clock(now),
        )
    }

    /// The LlamaNodes that cannot run a rank with `backend`, with why,
    /// counting the GPUs every deployment but `(namespace, name)` holds.
    fn backend_mismatches(
        &self,
        shards: &[Arc<LlamaShard>],
        exclude: (&str, &str),
        backend: Backend,
    ) -> BTreeMap<String, String> {
        if backend == Backend::Ring {
            return BTreeMap::new();
        }
        let usage = observe::usage_by_node(shards.iter().map(AsRef::as_ref), exclude);
        let nodes = self.stores.nodes.state();
        observe::backend_mismatches(backend, nodes.iter().map(AsRef::as_ref), &usage)
    }

    fn failure_count(&self, key: &str, failed: bool) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            let n = map.entry(key.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        } else {
            map.remove(key);
            0
        }
    }

    /// Publishes Events in the background, in order, so that reconcile
    /// latency does not include them.
    fn publish(&self, d: &LlamaDeployment, notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        let reference = d.object_ref(&());
        let recorder = self.recorder.clone();
        let fence = self.fence.clone();
        tokio::spawn(async move {
            for n in notices {
                if !fence.allows(Instant::now()) {
                    tracing::warn!(reason = %n.reason, object = ?reference.name, "not leading (any more): not publishing the Event");
                    return;
                }
                let event = Event {
                    type_: match n.severity {
                        Severity::Normal => EventType::Normal,
                        Severity::Warning => EventType::Warning,
                    },
                    reason: n.reason.clone(),
                    note: Some(truncate(&n.note, 1000)),
                    action: n.action.to_owned(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::warn!(error = %e, reason = %n.reason, "publishing an Event failed");
                }
            }
        });
    }

    async fn write_status(
        &self,
        d: &LlamaDeployment,
        prior: &LlamaDeploymentStatus,
        status: &LlamaDeploymentStatus,
    ) -> Result<(), Error> {
        let uid = d.uid().unwrap_or_default();
        // Unchanged from what the object shows, or from what this process
        // wrote a moment ago and the cache has not shown yet.
        let shown = d.status.as_ref() == Some(status);
        if prior == status && (shown || self.ledger.status_fresh(&uid, Instant::now())) {
            return Ok(());
        }
        let ns = d.namespace().unwrap_or_default();
        let name = d.name_any();
        self.may_write("LlamaDeployment status", &ns, &name)?;
        let api: Api<LlamaDeployment> = Api::namespaced(self.client.clone(), &ns);
        let body = serde_json::json!({
            "apiVersion": LlamaDeployment::api_version(&()),
            "kind": LlamaDeployment::kind(&()),
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(api_error("apply", "LlamaDeployment status", &ns, &name))?;
        self.ledger.set_status(&uid, status.clone(), Instant::now());
        Ok(())
    }

    /// The real Secret `ns/name` (metadata only), read past the labelled
    /// cache: `None` when missing, [`Error::ForeignSecret`] when it exists
    /// but `owner` does not control it, so it is never written.
    async fn own_secret(
        &self,
        ns: &str,
        name: &str,
        owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    ) -> Result<Option<PartialObjectMeta<Secret>>, Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let existing = api
            .get_metadata_opt(name)
            .await
            .map_err(api_error("get", "Secret", ns, name))?;
        match existing {
            Some(s) if !controlled_by(&s, &owner.uid) => Err(Error::ForeignSecret {
                name: format!("{ns}/{name}"),
            }),
            other => Ok(other),
        }
    }

    /// Writes `secret` as `ns/name`: applied over the deployment's own
    /// Secret when it `exists`, else created, so a Secret made in between
    /// is never adopted.
    async fn write_secret(
        &self,
        ns: &str,
        name: &str,
        secret: &Secret,
        exists: bool,
    ) -> Result<(), Error> {
        self.may_write("Secret", ns, name)?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        if exists {
            api.patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(secret),
            )
            .await
            .map_err(api_error("apply", "Secret", ns, name))?;
        } else {
            api.create(
                &PostParams {
                    field_manager: Some(MANAGER.to_owned()),
                    ..PostParams::default()
                },
                secret,
            )
            .await
            .map_err(api_error("create", "Secret", ns, name))?;
        }
        Ok(())
    }

    /// Makes the group-token Secret hold a token of `epoch`, minting a new
    /// token when it is missing or belongs to another epoch. What it holds is
    /// known from this process's own writes, else from the Secret cache.
    ///
    /// The cache holds only Secrets with the group-token label, so before
    /// writing, the real object is read: a Secret of that name the
    /// deployment does not own is never written ([`Error::ForeignSecret`]),
    /// and a missing one is created, never applied over, so one made in
    /// between is not adopted either.
    async fn ensure_token(
        &self,
        d: &LlamaDeployment,
        owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
        epoch: i64,
    ) -> Result<(), Error> {
        let ns = d.namespace().unwrap_or_default();
        let name = objects::group_token_secret_name(&d.name_any());
        let now = Instant::now();
        if self.ledger.token_written(&owner.uid, epoch, now) {
            return Ok(());
        }
        let cached = self.token_secrets.get(&ObjectRef::new(&name).within(&ns));
        if let Some(s) = &cached
            && controlled_by(s.as_ref(), &owner.uid)
            && objects::secret_epoch(s.as_ref()) == Some(epoch)
        {
            return Ok(());
        }
        let existing = self.own_secret(&ns, &name, owner).await?;
        if let Some(s) = &existing
            && objects::secret_epoch(s) == Some(epoch)
        {
            self.ledger.record_token(&owner.uid, epoch, now);
            return Ok(());
        }
        let digest = self.api_key_digest(d).await?;
        let secret =
            objects::build_secret(d, owner, epoch, &objects::random_token(), digest.as_deref());
        self.write_secret(&ns, &name, &secret, existing.is_some())
            .await?;
        self.ledger.record_token(&owner.uid, epoch, now);
        Ok(())
    }

    /// Makes the deployment's TLS Secret hold a certificate of the
    /// operator's CA naming `addresses`, issuing a new one when the Secret
    /// is missing, names other addresses (the placement moved) or is due
    /// for renewal.
    async fn ensure_tls(
        &self,
        d: &LlamaDeployment,
        owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
        addresses: &[std::net::IpAddr],
    ) -> Result<(), Error> {
        let ns = d.namespace().unwrap_or_default();
        let name = objects::tls_secret_name(&d.name_any());
        let wanted = tls::addresses_annotation(addresses);
        let today = Timestamp::now().to_zoned(TimeZone::UTC).date();
        let issued_here = self
            .tls_issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&owner.uid)
            .cloned();
        if let Some((issued, renewal, at)) = &issued_here
            && at.elapsed() < Duration::from_secs(60)
            && tls::still_fits(Some(issued), Some(renewal), &wanted, today)
        {
            return Ok(());
        }
        let cached = self.token_secrets.get(&ObjectRef::new(&name).within(&ns));
        if let Some(s) = &cached
            && controlled_by(s.as_ref(), &owner.uid)
        {
            let (issued, renewal) = objects::tls_annotations(s.as_ref());
            if tls::still_fits(issued, renewal, &wanted, today) {
                return Ok(());
            }
        }
        // As for the token: the real object decides, never the labelled
        // cache, so a Secret of that name the deployment does not own is
        // left alone.
        let existing = self.own_secret(&ns, &name, owner).await?;
        if let Some(s) = &existing {
            let (issued, renewal) = objects::tls_annotations(s);
            if tls::still_fits(issued, renewal, &wanted, today) {
                return Ok(());
            }
        }
        self.may_write("Secret", &ns, &name)?;
        let issued = self
            .config
            .ca
            .issue(&d.name_any(), addresses, today)
            .map_err(|e| Error::Certificate {
                name: format!("{ns}/{name}"),
                message: e.to_string(),
            })?;
        let renewal = issued.renew_after.to_string();
        let secret = objects::build_tls_secret(
            d,
            owner,
            &wanted,
            &renewal,
            tls::secret_data(&issued, self.config.ca.cert_pem()),
        );
        self.write_secret(&ns, &name, &secret, existing.is_some())
            .await?;
        tracing::info!(secret = %format!("{ns}/{name}"), addresses = %wanted, renew_after = %renewal, "issued a serving certificate");
        self.tls_issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(owner.uid.clone(), (wanted, renewal, Instant::now()));
        Ok(())
    }

    /// The digest of the deployment's API key, read from its
    /// `spec.serving.apiKeySecretRef`; `None` without one. Agents never get
    /// the key itself: it goes into the group-token Secret as this digest.
    async fn api_key_digest(&self, d: &LlamaDeployment) -> Result<Option<String>, Error> {
        let Some(reference) = d
            .spec
            .serving
            .as_ref()
            .and_then(|s| s.api_key_secret_ref.as_ref())
        else {
            return Ok(None);
        };
        let ns = d.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let secret = api.get(&reference.name).await.map_err(api_error(
            "get",
            "Secret",
            &ns,
            &reference.name,
        ))?;
        let key = reference
            .key
            .as_deref()
            .unwrap_or(tandem_crds::DEFAULT_API_KEY_KEY);
        let value = secret
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::MissingField {
                kind: "Secret",
                name: format!("{ns}/{}", reference.name),
                field: "the API key (spec.serving.apiKeySecretRef.key, default api-key)",
            })?;
        Ok(Some(tandem_crds::api_key_digest(value)))
    }

    /// Keeps one Role and RoleBinding per node holding shards of `d` (see
    /// [`tandem_crds::NodeAccess`]): exactly those shards' status and the
    /// deployment's token and TLS Secrets, for that node's identity. Roles
    /// of nodes that no longer hold a shard of `d` are deleted.
    async fn ensure_node_access(
        &self,
        d: &LlamaDeployment,
        owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
        placed: &[(String, String)],
    ) -> Result<(), Error> {
        let ns = d.namespace().unwrap_or_default();
        let deployment = d.name_any();
        let own_tls = d.spec.tls_user_secret().map(str::to_owned);
        let wanted: Vec<_> = node_accesses(
            &ns,
            &deployment,
            placed.iter().map(|(s, n)| (s.as_str(), n.as_str())),
        )
        .into_iter()
        .map(|access| NodeAccess {
            tls_secret: own_tls.clone(),
            ..access
        })
        .collect();
        let roles: Api<Role> = Api::namespaced(self.client.clone(), &ns);
        let bindings: Api<RoleBinding> = Api::namespaced(self.client.clone(), &ns);
        let params = PatchParams::apply(MANAGER).force();
        let identity_ns = &self.config.lease_namespace;
        let mut keep = BTreeSet::new();
        for access in &wanted {
            let role = access.role(Some(owner));
            let name = role.name_any();
            keep.insert(name.clone());
            let cached = self.node_roles.get(&ObjectRef::new(&name).within(&ns));
            if cached.is_some_and(|c| c.rules == role.rules) {
                continue;
            }
            self.may_write("Role", &ns, &name)?;
            // The binding first would be harmless too; the Role first keeps
            // the binding from ever pointing at nothing.
            roles
                .patch(&name, &params, &Patch::Apply(&role))
                .await
                .map_err(api_error("apply", "Role", &ns, &name))?;
            let binding = access.role_binding(identity_ns, Some(owner));
            bindings
                .patch(&name, &params, &Patch::Apply(&binding))
                .await
                .map_err(api_error("apply", "RoleBinding", &ns, &name))?;
        }
        let stale: Vec<String> = self
            .node_roles
            .state()
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(ns.as_str()))
            .filter(|r| r.owner_references().iter().any(|o| o.uid == owner.uid))
            .map(|r| r.name_any())
            .filter(|name| !keep.contains(name))
            .collect();
        for name in stale {
            self.may_write("Role deletion", &ns, &name)?;
            for result in [
                bindings
                    .delete(&name, &DeleteParams::background())
                    .await
                    .map(|_| ()),
                roles
                    .delete(&name, &DeleteParams::background())
                    .await
                    .map(|_| ()),
            ] {
                match result {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(api_error("delete", "Role", &ns, &name)(e)),
                }
            }
        }
        Ok(())
    }

    async fn delete_shards(&self, ns: &str, names: &[String]) -> Result<(), Error> {
        let api: Api<LlamaShard> = Api::namespaced(self.client.clone(), ns);
        let now = Instant::now();
        let todo = names
            .iter()
            .filter(|name| !self.ledger.recently_deleted(ns, name, now));
        future::try_join_all(todo.map(|name| {
            let api = &api;
            async move {
                self.may_write("LlamaShard deletion", ns, name)?;
                match api.delete(name, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(api_error("delete", "LlamaShard", ns, name)(e)),
                }
                self.ledger.record_deleted(ns, name, Instant::now());
                Ok(())
            }
        }))
        .await?;
        Ok(())
    }
}

/// How often a deployment whose Secret name is taken looks again: the
/// Secret in the way carries no label the operator watches.
const SECRET_CONFLICT_RECHECK: Duration = Duration::from_secs(10);

/// `(shard, node)` of every shard of the epoch `decided` settles on: the
/// shards it writes, else the current epoch's existing ones, without those
/// it deletes.
fn placed_shards(own: &[&LlamaShard], decided: &decide::Outcome) -> Vec<(String, String)> {
    if decided.token_epoch.is_none() {
        return Vec::new();
    }
    if !decided.apply.is_empty() {
        return decided
            .apply
            .iter()
            .map(|s| (s.name_any(), s.spec.node_name.clone()))
            .collect();
    }
    own.iter()
        .filter(|s| s.spec.epoch == decided.status.epoch)
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .map(|s| (s.name_any(), s.spec.node_name.clone()))
        .filter(|(name, _)| !decided.delete.contains(name))
        .collect()
}

/// Cuts a note to the Events API's limit, on a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The shards `d` controls, from the cache plus this process's recent writes,
/// and every shard (for other deployments' usage).
fn shard_views(ctx: &Context, uid: &str) -> (Vec<Arc<LlamaShard>>, Vec<Arc<LlamaShard>>) {
    let all = ctx.ledger.merge(ctx.stores.shards.state(), Instant::now());
    let own = all
        .iter()
        .filter(|s| controlled_by(s.as_ref(), uid))
        .cloned()
        .collect();
    (all, own)
}

async fn apply(d: Arc<LlamaDeployment>, ctx: &Context) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let missing = |field| Error::MissingField {
        kind: "LlamaDeployment",
        name: format!("{ns}/{name}"),
        field,
    };
    let uid = d.uid().ok_or_else(|| missing("metadata.uid"))?;
    let owner = objects::owner_reference(&d).ok_or_else(|| missing("metadata.uid"))?;
    let prior = ctx
        .ledger
        .status(&uid)
        .unwrap_or_else(|| d.status.clone().unwrap_or_default());

    let outcome = {
        // Planning and recording the shards it writes happen under one lock,
        // so the next deployment planned sees them as taken.
        let _guard = ctx.placement.lock().unwrap_or_else(|e| e.into_inner());
        let now = Timestamp::now();
        let (all, own) = shard_views(ctx, &uid);
        let nodes = ctx.node_view(&all, (&ns, &name), now);
        let mismatched = ctx.backend_mismatches(&all, (&ns, &name), d.spec.backend);
        let own: Vec<&LlamaShard> = own.iter().map(AsRef::as_ref).collect();
        let decided = decide::reconcile(
            &ReconcileInput {
                deployment: &d,
                owner: &owner,
                prior: &prior,
                shards: &own,
                nodes: &nodes,
                mismatched: &mismatched,
                now,
            },
            &ctx.config.settings,
        );
        ctx.ledger.record_written(&decided.apply, Instant::now());
        let placed = placed_shards(&own, &decided);
        (decided, placed)
    };
    let (outcome, placed) = outcome;

    // The certificate names the current epoch's nodes: those of the shards
    // this pass writes, else of the shards already there.
    let issued_tls = d.spec.tls_enabled() && d.spec.tls_user_secret().is_none();
    let tls_addresses = issued_tls
        .then(|| {
            outcome
                .apply
                .first()
                .map(|s| s.spec.clone())
                .or_else(|| {
                    let (_, own) = shard_views(ctx, &uid);
                    own.iter()
                        .filter(|s| s.spec.epoch == outcome.status.epoch)
                        .map(|s| s.spec.clone())
                        .next()
                })
                .map(|spec| tls::certificate_addresses(&spec))
        })
        .flatten();
    let written = async {
        if let Some(epoch) = outcome.token_epoch {
            ctx.ensure_token(&d, &owner, epoch).await?;
        }
        // Each node's rights before its shards, so an agent that sees its
        // shard can read the token; an agent that is faster than the RBAC
        // cache retries (docs/agent.md).
        ctx.ensure_node_access(&d, &owner, &placed).await?;
        if let Some(addresses) = &tls_addresses {
            ctx.ensure_tls(&d, &owner, addresses).await?;
        }
        // The token first (ranks read it as they start), then every shard
        // of the epoch at once.
        let api: Api<LlamaShard> = Api::namespaced(ctx.client.clone(), &ns);
        let params = PatchParams::apply(MANAGER).force();
        future::try_join_all(outcome.apply.iter().map(|shard| {
            let (api, params, ns) = (&api, &params, &ns);
            async move {
                let shard_name = shard.name_any();
                ctx.may_write("LlamaShard", ns, &shard_name)?;
                api.patch(&shard_name, params, &Patch::Apply(shard))
                    .await
                    .map_err(api_error("apply", "LlamaShard", ns, &shard_name))
            }
        }))
        .await?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = written {
        ctx.ledger.forget_written(&outcome.apply);
        if let Error::ForeignSecret { name: secret } = &e {
            // Nothing of the epoch was written: say why on the deployment,
            // and look again (the Secret is outside the watched set).
            let (status, notices) = decide::secret_conflict(&d, &prior, secret, Timestamp::now());
            ctx.write_status(&d, &prior, &status).await?;
            ctx.metrics.set_phase(&uid, status.phase);
            ctx.publish(&d, notices);
            tracing::warn!(deployment = %format!("{ns}/{name}"), error = %e, "not placing");
            return Ok(Action::requeue(SECRET_CONFLICT_RECHECK));
        }
        return Err(e);
    }
    if let Some(cause) = &outcome.new_epoch {
        ctx.metrics.epoch_started(cause.label());
        tracing::info!(deployment = %format!("{ns}/{name}"), epoch = outcome.status.epoch, cause = cause.label(), "started a new epoch");
    }
    ctx.delete_shards(&ns, &outcome.delete).await?;
    let mut status = outcome.status;
    status.ca_bundle = issued_tls.then(|| ctx.config.ca.cert_pem().to_owned());
    ctx.write_status(&d, &prior, &status).await?;
    ctx.metrics.set_phase(&uid, status.phase);
    ctx.publish(&d, outcome.notices);
    Ok(Action::requeue(outcome.requeue_after))
}

async fn cleanup(d: Arc<LlamaDeployment>, ctx: &Context) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let uid = d.uid().unwrap_or_default();
    let prior = ctx
        .ledger
        .status(&uid)
        .unwrap_or_else(|| d.status.clone().unwrap_or_default());
    let now = Timestamp::now();
    let (all, own) = shard_views(ctx, &uid);
    let live: BTreeSet<String> = ctx
        .node_view(&all, (&ns, &name), now)
        .into_iter()
        .filter(|n| n.ready)
        .map(|n| n.name)
        .collect();
    let nodes = ctx.stores.nodes.state();
    let held = observe::held_shards(nodes.iter().map(AsRef::as_ref), &live, &ns, &name);
    // Shards this process deleted may linger in the cache for a moment.
    let own: Vec<&LlamaShard> = own
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| {
            s.metadata.deletion_timestamp.is_some()
                || !ctx
                    .ledger
                    .recently_deleted(&ns, &s.name_any(), Instant::now())
        })
        .collect();
    let outcome = decide::cleanup(
        &CleanupInput {
            deployment: &d,
            prior: &prior,
            shards: &own,
            held: &held,
            now,
        },
        &ctx.config.settings,
    );
    ctx.delete_shards(&ns, &outcome.delete).await?;
    ctx.publish(&d, outcome.notices);
    if outcome.done {
        tracing::info!(deployment = %format!("{ns}/{name}"), "every shard released; removing the finalizer");
        ctx.ledger.forget_status(&uid);
        ctx.metrics.set_phase(&uid, None);
        return Ok(Action::await_change());
    }
    ctx.write_status(&d, &prior, &outcome.status).await?;
    ctx.metrics.set_phase(&uid, outcome.status.phase);
    Err(Error::ReleasePending {
        name: format!("{ns}/{name}"),
        count: own.len() + held.len(),
        retry_after: outcome.requeue_after,
    })
}

/// Reconciles one LlamaDeployment.
pub async fn reconcile(d: Arc<LlamaDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconcile_started();
    ctx.wait_for_caches().await;
    let ns = d.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", d.name_any());
    let api: Api<LlamaDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    // The finalizer helper may write the finalizer itself.
    if let Err(e) = ctx.may_write("LlamaDeployment", &ns, &d.name_any()) {
        ctx.metrics.reconcile_finished(started.elapsed());
        ctx.metrics.reconcile_failed(e.category());
        return Err(e);
    }
    let result = finalizer(&api, FINALIZER, d, |event| async {
        match event {
            FinalizerEvent::Apply(d) => apply(d, &ctx).await,
            FinalizerEvent::Cleanup(d) => cleanup(d, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    ctx.metrics.reconcile_finished(started.elapsed());
    match &result {
        Ok(_) => {
            ctx.failure_count(&key, false);
        }
        Err(e) => {
            ctx.metrics.reconcile_failed(e.category());
            if !matches!(e.root(), Error::ReleasePending { .. }) {
                tracing::warn!(deployment = %key, category = e.category(), error = %e, "reconcile failed");
            }
        }
    }
    result
}

/// Retry policy after a failed reconcile: waiting for agents is retried on
/// its own schedule; real errors back off per deployment, doubling from half
/// a second up to five minutes, and are reported as a Warning Event.
pub fn error_policy(d: Arc<LlamaDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::ReleasePending { retry_after, .. } = error.root() {
        return Action::requeue(*retry_after);
    }
    if let Error::NotLeading { .. } = error.root() {
        // The controller is about to stop; an Event could not be written anyway.
        return Action::requeue(Duration::from_secs(1));
    }
    let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
    let n = ctx.failure_count(&key, true);
    let delay = Duration::from_millis(500)
        .checked_mul(
            1u32.checked_shl(n.saturating_sub(1).min(20))
                .unwrap_or(u32::MAX),
        )
        .unwrap_or(Duration::MAX)
        .min(Duration::from_secs(300));
    let notice = Notice {
        severity: Severity::Warning,
        reason: "ReconcileFailed".into(),
        action: "Reconcile",
        note: format!(
            "{} error: {error}; retrying in {}s",
            error.category(),
            delay.as_secs_f32()
        ),
    };
    ctx.publish(&d, vec![notice]);
    Action::requeue(delay)
}

/// Drops `managedFields` from cached objects: nothing reads them, and they
/// are a good part of every object's size.
fn slim<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Hashes what about a node matters to placement: labels, the port-range
/// annotation, the spec, the capacity (GPUs included), the OS and backend
/// (`spec.backend` eligibility) and the Ready condition. Status
/// churn (allocated bytes, the shard list) does not trigger reconciles.
fn node_fingerprint(node: &LlamaNode) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.labels().hash(&mut h);
    node.annotations().get(ANNOTATION_PORT_RANGE).hash(&mut h);
    node.spec.address.hash(&mut h);
    node.spec.unschedulable.hash(&mut h);
    if let Some(s) = &node.status {
        if let Some(c) = &s.capacity {
            (c.memory_bytes, c.wired_limit_bytes, c.gpus).hash(&mut h);
        }
        (&s.os, &s.backend).hash(&mut h);
        for c in s.conditions.iter().filter(|c| c.type_ == "Ready") {
            c.status.hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Runs the controller until `stop` turns true. Returns when every watch has
/// stopped and in-flight reconciles have finished. Every write passes `fence`.
pub async fn run(
    client: Client,
    config: RunConfig,
    metrics: Arc<Metrics>,
    fence: Fence,
    stop: watch::Receiver<bool>,
) {
    let deployments: Api<LlamaDeployment> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let shards_api: Api<LlamaShard> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Metadata only: the operator never reads tokens back.
    let secrets_api: Api<PartialObjectMeta<Secret>> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let roles_api: Api<Role> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let nodes_api: Api<LlamaNode> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), &config.lease_namespace);

    let (shard_store, shard_writer) = reflector::store();
    let shard_events = watcher(shards_api, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(shard_writer)
        .touched_objects();
    let (node_store, node_writer) = reflector::store();
    let node_events = watcher(nodes_api, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(node_writer)
        .touched_objects()
        .predicate_filter(node_fingerprint, Default::default());
    let (token_store, token_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let token_events = watcher(
        secrets_api,
        watcher::Config::default().labels(LABEL_GROUP_TOKEN),
    )
    .default_backoff()
    .reflect(token_writer)
    .touched_objects();
    let (role_store, role_writer) = reflector::store::<Role>();
    let role_events = watcher(
        roles_api,
        watcher::Config::default().labels(&format!("{LABEL_NODE_ACCESS}=true")),
    )
    .default_backoff()
    .modify(slim)
    .reflect(role_writer)
    .touched_objects();
    let (lease_store, lease_writer) = reflector::store::<Lease>();
    let lease_watch = Arc::new(LeaseWatch::new(Timestamp::now()));

    let mut stop_leases = stop.clone();
    let lease_task = {
        let lease_watch = Arc::clone(&lease_watch);
        let events = watcher(leases_api, watcher::Config::default())
            .default_backoff()
            .modify(slim)
            .reflect(lease_writer);
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            loop {
                tokio::select! {
                    next = events.next() => match next {
                        Some(Ok(watcher::Event::InitDone)) => lease_watch.relisted(Timestamp::now()),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!(error = %e, "node Lease watch failed; retrying"),
                        None => return,
                    },
                    _ = stop_leases.wait_for(|s| *s) => return,
                }
            }
        })
    };

    let (deployment_store, deployment_writer) = reflector::store();
    let deployment_events = watcher(deployments, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(deployment_writer)
        .applied_objects();
    let controller = Controller::for_stream(deployment_events, deployment_store.clone())
        .with_config(ControllerConfig::default().concurrency(config.concurrency));
    let watched = Watched {
        nodes: node_store,
        leases: lease_store,
        shards: shard_store,
        deployments: deployment_store,
    };
    // One task waits for the caches and tells everyone else through a watch
    // channel: a store's own readiness future wakes only its latest waiter.
    let (ready_tx, caches_ready) = watch::channel(false);
    let readiness_task = {
        let watched = watched.clone();
        let tokens = token_store.clone();
        let roles = role_store.clone();
        tokio::spawn(async move {
            let shards = watched.shards.wait_until_ready().await;
            let nodes = watched.nodes.wait_until_ready().await;
            let leases = watched.leases.wait_until_ready().await;
            let tokens = tokens.wait_until_ready().await;
            let roles = roles.wait_until_ready().await;
            if shards.is_ok() && nodes.is_ok() && leases.is_ok() && tokens.is_ok() && roles.is_ok()
            {
                tracing::info!("watch caches are filled");
                let _ = ready_tx.send(true);
            }
        })
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let liveness_task = tokio::spawn(liveness::run(
        watched.clone(),
        Arc::clone(&lease_watch),
        config.liveness_tick,
        tx,
        caches_ready.clone(),
        stop.clone(),
    ));
    let liveness_triggers =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let node_mapper = {
        let watched = watched.clone();
        move |node: LlamaNode| {
            liveness::affected_deployments(
                &node.name_any(),
                true,
                &watched.shards.state(),
                &watched.deployments.state(),
            )
        }
    };
    let mut stop_signal = stop.clone();
    let shutdown = async move {
        let _ = stop_signal.wait_for(|s| *s).await;
    };

    let reporter = Reporter {
        controller: MANAGER.to_owned(),
        instance: Some(config.identity.clone()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        metrics,
        config,
        stores: watched,
        ledger: Ledger::default(),
        placement: Mutex::new(()),
        lease_watch,
        token_secrets: token_store,
        tls_issued: Mutex::new(HashMap::new()),
        node_roles: role_store,
        caches_ready,
        failures: Mutex::new(HashMap::new()),
        fence,
    });

    controller
        .owns_stream(shard_events)
        .owns_stream(token_events)
        .owns_stream(role_events)
        .watches_stream(node_events, node_mapper)
        .reconcile_on(liveness_triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok(_) => {}
                Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {}
                Err(kube::runtime::controller::Error::ReconcilerFailed(_, _)) => {}
                Err(e) => tracing::warn!(error = %e, "controller: watch or queue error"),
            }
            future::ready(())
        })
        .await;
    liveness_task.abort();
    lease_task.abort();
    readiness_task.abort();
}
