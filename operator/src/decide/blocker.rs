//! Why a deployment cannot be placed: a spec the planner refuses, a selector
//! or serving limits that make no sense, or too few nodes that can run its
//! backend. Each is a condition reason and a message saying what would work.

use std::collections::{BTreeMap, BTreeSet};

use tandem_crds::Backend;
use tandem_planner::{DeploymentRequest, NodeInfo, PlanError};

use crate::observe::backend_needs;

/// Why a deployment's spec cannot be planned at all, before any node is
/// looked at, or why no node fits. Each has a CamelCase reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// The planner's verdict: `InvalidSharding`, `UnknownModel`,
    /// `NoMatchingNodes` or `InsufficientMemory`.
    Plan(PlanError),
    /// `spec.placement.nodeSelector` uses an operator Kubernetes does not have.
    InvalidSelector(String),
    /// `spec.serving`'s batch limits cannot work together with the rest of
    /// the spec (see [`batch_limits`](crate::convert::batch_limits)): `InvalidServing`.
    InvalidServing(String),
    /// Too few of the matching nodes can run `spec.backend` (see
    /// [`backend_mismatch`](crate::observe::backend_mismatch)): `BackendUnavailable`.
    BackendUnavailable(String),
}

impl Blocker {
    /// The condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::Plan(e) => e.reason(),
            Blocker::InvalidSelector(_) => "InvalidSelector",
            Blocker::InvalidServing(_) => "InvalidServing",
            Blocker::BackendUnavailable(_) => "BackendUnavailable",
        }
    }

    /// What is wrong and what would work.
    pub fn message(&self) -> String {
        match self {
            Blocker::Plan(e) => e.message().to_owned(),
            Blocker::InvalidSelector(m)
            | Blocker::InvalidServing(m)
            | Blocker::BackendUnavailable(m) => m.clone(),
        }
    }

    /// Whether only a change of the spec can lift it (as opposed to nodes
    /// coming, going or freeing memory).
    pub fn is_spec_error(&self) -> bool {
        match self {
            Blocker::Plan(PlanError::InvalidSharding { .. } | PlanError::UnknownModel { .. }) => {
                true
            }
            Blocker::Plan(_) | Blocker::BackendUnavailable(_) => false,
            Blocker::InvalidSelector(_) | Blocker::InvalidServing(_) => true,
        }
    }
}

/// The blocker for a failed plan that was made without the nodes in
/// `mismatched` (see [`backend_mismatches`]). When too few of the nodes that
/// match the selector are left because of the backend, that is the reason
/// (`BackendUnavailable`), naming the nodes and why; any other failure is the
/// planner's.
pub fn backend_blocker(
    backend: Backend,
    error: PlanError,
    request: &DeploymentRequest,
    nodes: &[NodeInfo],
    mismatched: &BTreeMap<String, String>,
) -> Blocker {
    if !matches!(error, PlanError::NoMatchingNodes { .. }) {
        return Blocker::Plan(error);
    }
    let matching: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| request.selector.matches(&n.labels))
        .map(|n| n.name.as_str())
        .collect();
    let why: Vec<&str> = matching
        .iter()
        .filter_map(|n| mismatched.get(*n).map(String::as_str))
        .collect();
    let qualify = matching.len() - why.len();
    if why.is_empty() || qualify >= request.world_size as usize {
        return Blocker::Plan(error);
    }
    const SHOWN: usize = 5;
    let mut listed = why[..why.len().min(SHOWN)].join(", ");
    if why.len() > SHOWN {
        listed.push_str(&format!(", and {} more", why.len() - SHOWN));
    }
    let of = if request.selector.is_empty() {
        format!("{} registered nodes", matching.len())
    } else {
        format!(
            "{} nodes matching selector {}",
            matching.len(),
            request.selector
        )
    };
    let (needs, instead) = backend_needs(backend);
    let backend = match backend {
        Backend::Ring => "Ring",
        Backend::Jaccl => "Jaccl",
        Backend::Nccl => "Nccl",
    };
    let w = request.world_size;
    Blocker::BackendUnavailable(format!(
        "backend {backend} needs {needs}; {qualify} of {of} qualify ({listed}), but {w} rank{} \
         {} requested; {instead}",
        if w == 1 { "" } else { "s" },
        if w == 1 { "was" } else { "were" },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::deployment_request;
    use crate::fixtures::*;
    use crate::observe::backend_mismatches;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
    use kube::ResourceExt;
    use tandem_crds::LlamaNode;
    use tandem_planner::PortRange;

    use tandem_crds::Placement;

    #[test]
    fn too_few_nodes_for_the_backend_is_its_own_reason() {
        let nodes: Vec<LlamaNode> = (1..=4)
            .map(|i| node(&format!("demo-{i}"), &format!("10.0.0.{i}"), 64))
            .collect();
        let infos: Vec<NodeInfo> = nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name_any(),
                address: n.spec.address.clone(),
                labels: BTreeMap::new(),
                ready: true,
                unschedulable: false,
                capacity_bytes: 64 << 30,
                allocated_bytes: 0,
                port_range: PortRange {
                    first: 47000,
                    last: 47999,
                },
                used_ports: BTreeSet::new(),
            })
            .collect();
        let mismatched = backend_mismatches(Backend::Nccl, &nodes, &BTreeMap::new());
        let mut d = deployment("a", MODEL_1B, 2);
        d.spec.backend = Backend::Nccl;
        let request = deployment_request(&d).expect("request");
        let no_nodes = || PlanError::NoMatchingNodes {
            world_size: 2,
            eligible_nodes: 0,
            message: "no LlamaNodes are registered".into(),
        };
        let b = backend_blocker(Backend::Nccl, no_nodes(), &request, &infos, &mismatched);
        assert_eq!(b.reason(), "BackendUnavailable");
        assert!(!b.is_spec_error(), "CUDA nodes may still come");
        assert_eq!(
            b.message(),
            "backend Nccl needs nodes running the agent's CUDA backend with a free GPU (one \
             rank per GPU); 0 of 4 registered nodes qualify (demo-1 runs cpu, demo-2 runs \
             cpu, demo-3 runs cpu, demo-4 runs cpu), but 2 ranks were requested; run the \
             agent with --backend cuda (and --gpus N) on more nodes, free GPUs held by other \
             Nccl deployments, lower spec.sharding.worldSize, or use backend Ring"
        );

        // Enough qualifying nodes: the planner's own reason stands.
        let b = backend_blocker(
            Backend::Nccl,
            no_nodes(),
            &request,
            &infos,
            &BTreeMap::new(),
        );
        assert_eq!(b, Blocker::Plan(no_nodes()));
        let few: BTreeMap<String, String> =
            [("demo-1".to_owned(), "demo-1 runs cpu".to_owned())].into();
        let b = backend_blocker(Backend::Nccl, no_nodes(), &request, &infos, &few);
        assert_eq!(b.reason(), "NoMatchingNodes");
        // Memory is the planner's business.
        let memory = PlanError::InsufficientMemory {
            world_size: 2,
            bytes_per_rank: 1,
            message: "short".into(),
        };
        let b = backend_blocker(Backend::Nccl, memory, &request, &infos, &mismatched);
        assert_eq!(b.reason(), "InsufficientMemory");

        // Only nodes matching the selector count.
        d.spec.placement = Some(Placement {
            node_selector: Some(metav1::LabelSelector {
                match_labels: Some([("pool".to_owned(), "gpu".to_owned())].into()),
                match_expressions: None,
            }),
        });
        let request = deployment_request(&d).expect("request");
        let mut infos = infos;
        infos[3].labels.insert("pool".into(), "gpu".into());
        let b = backend_blocker(Backend::Nccl, no_nodes(), &request, &infos, &mismatched);
        assert!(
            b.message()
                .contains("0 of 1 nodes matching selector pool=gpu qualify (demo-4 runs cpu)"),
            "{}",
            b.message()
        );
    }
}
