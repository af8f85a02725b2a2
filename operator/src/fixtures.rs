//! The operator's test fixtures: deployments, nodes, Leases and shards as
//! the API server would return them, shared by every module's unit tests.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use tandem_planner::lookup_model;

use tandem_crds::{
    BatchLimits, LlamaDeployment, LlamaDeploymentSpec, LlamaNode, LlamaNodeSpec, LlamaNodeStatus,
    LlamaShard, LlamaShardSpec, NodeCapacity, Peer, SecretKeyRef, Sharding,
    ShardingStrategy as CrdStrategy,
};

pub const MODEL_1B: &str = "mlx-community/Llama-3.2-1B-Instruct-4bit";
pub const GIB: i64 = 1 << 30;

pub fn ts(seconds: i64) -> Timestamp {
    Timestamp::from_second(seconds).expect("timestamp")
}

pub fn deployment(name: &str, model: &str, world: i32) -> LlamaDeployment {
    let mut d = LlamaDeployment::new(
        name,
        LlamaDeploymentSpec {
            model: model.to_owned(),
            revision: None,
            sharding: Sharding {
                strategy: CrdStrategy::Tensor,
                world_size: world,
            },
            placement: None,
            backend: Default::default(),
            max_context_tokens: 8192,
            serving: None,
            architecture: None,
            tls: None,
        },
    );
    d.metadata.namespace = Some("ns".into());
    d.metadata.uid = Some(format!("uid-{name}"));
    d.metadata.generation = Some(1);
    d
}

pub fn node(name: &str, address: &str, memory_gib: i64) -> LlamaNode {
    let mut n = LlamaNode::new(
        name,
        LlamaNodeSpec {
            address: address.to_owned(),
            unschedulable: false,
        },
    );
    n.status = Some(LlamaNodeStatus {
        capacity: Some(NodeCapacity {
            memory_bytes: memory_gib * GIB,
            wired_limit_bytes: None,
            cpu_cores: 8,
            gpu_cores: None,
            gpus: None,
        }),
        os: Some("linux".into()),
        backend: Some("cpu".into()),
        ..Default::default()
    });
    n
}

/// A Linux node whose agent runs MLX's CUDA backend with `gpus` GPUs.
pub fn cuda_node(name: &str, address: &str, memory_gib: i64, gpus: i32) -> LlamaNode {
    let mut n = node(name, address, memory_gib);
    if let Some(s) = n.status.as_mut() {
        s.backend = Some("cuda".into());
        if let Some(c) = s.capacity.as_mut() {
            c.gpus = Some(gpus);
        }
    }
    n
}

pub fn lease(name: &str, renewed: Timestamp, seconds: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("tandem-system".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.into()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }),
    }
}

pub fn shard(deployment: &str, node: &str, ring: &str, rank: i32, world: i32) -> LlamaShard {
    let shape = lookup_model(MODEL_1B).expect("1b").shape;
    let mut peers: Vec<Peer> = (0..world)
        .map(|r| Peer {
            rank: r,
            node: format!("peer-{r}"),
            address: format!("10.0.0.{r}:47000"),
        })
        .collect();
    if let Some(p) = peers.get_mut(usize::try_from(rank).expect("rank")) {
        p.node = node.to_owned();
        p.address = ring.to_owned();
    }
    let mut s = LlamaShard::new(
        &format!("{deployment}-e1-r{rank}"),
        LlamaShardSpec {
            deployment: deployment.to_owned(),
            epoch: 1,
            rank,
            world_size: world,
            node_name: node.to_owned(),
            model: MODEL_1B.to_owned(),
            revision: None,
            architecture: tandem_crds::Architecture::from_shape(&shape),
            backend: Default::default(),
            peers,
            control_address: "10.0.0.1:47001".into(),
            serving_port: (rank == 0).then_some(8080),
            group_token_secret_ref: SecretKeyRef {
                name: format!("{deployment}-group-token"),
                key: Some("token".into()),
            },
            api_key_secret_ref: None,
            tls_secret_ref: Some(tandem_crds::SecretRef {
                name: format!("{deployment}-tls"),
            }),
            max_context_tokens: 8192,
            batching: Some(BatchLimits::default()),
        },
    );
    s.metadata.namespace = Some("ns".into());
    s
}
