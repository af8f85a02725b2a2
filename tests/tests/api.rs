//! The API against the real kube-apiserver: CRD installation, round trips,
//! the scale subresource, printer columns, `kubectl explain`, schema
//! rejection of bad manifests, the chart's RBAC for each identity, and the
//! garbage collector's ownerReference cascade.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, LabelSelectorRequirement, OwnerReference, Time,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use tandem_crds::*;
use tandem_tests::{Identity, TestNamespace, cluster, eventually, repo_root, unique_name};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn architecture() -> Architecture {
    Architecture {
        num_hidden_layers: 16,
        hidden_size: 2048,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        intermediate_size: 8192,
        vocab_size: 128256,
        head_dim: Some(64),
        tie_word_embeddings: true,
        quantization: Some(Quantization {
            bits: 4,
            group_size: 64,
        }),
        dtype: WeightDtype::BFloat16,
    }
}

/// A deployment with every spec field set.
fn full_deployment(name: &str) -> LlamaDeployment {
    LlamaDeployment::new(
        name,
        LlamaDeploymentSpec {
            model: "example-org/Custom-Llama-1B-4bit".into(),
            revision: Some("refs/pr/3".into()),
            sharding: Sharding {
                strategy: ShardingStrategy::Tensor,
                world_size: 2,
            },
            placement: Some(Placement {
                node_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        LABEL_CHIP.to_string(),
                        "apple-m3-ultra".to_string(),
                    )])),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: LABEL_MEMORY_GIB.into(),
                        operator: "In".into(),
                        values: Some(vec!["192".into(), "512".into()]),
                    }]),
                }),
            }),
            backend: Backend::Jaccl,
            max_context_tokens: 4096,
            serving: Some(Serving {
                port: 9090,
                api_key_secret_ref: Some(SecretKeyRef {
                    name: "llama-api-key".into(),
                    key: Some("key".into()),
                }),
                max_batch_sequences: Some(4),
                max_batch_tokens: Some(16384),
                prefill_chunk_tokens: Some(512),
                prefix_cache_bytes: Some(0),
                max_completion_tokens: Some(1024),
            }),
            architecture: Some(architecture()),
            tls: Some(Tls {
                enabled: Some(true),
                secret_name: Some("llama-own-tls".into()),
            }),
        },
    )
}

fn condition(type_: &str, status: &str, reason: &str, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: format!("{type_} is {status}"),
        observed_generation: Some(generation),
        last_transition_time: Time(
            k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).expect("valid timestamp"),
        ),
    }
}

#[tokio::test]
async fn crds_install_with_kubectl_apply_and_server_side_apply() {
    let c = cluster();
    let dir = repo_root().join("crds");
    let dir = dir.to_string_lossy();

    let out = c.kubectl(Identity::Admin, &["apply", "-f", &dir]).unwrap();
    assert!(out.status.success(), "kubectl apply: {}", stderr(&out));
    for kind in ["llamadeployments", "llamashards", "llamanodes"] {
        assert!(
            stdout(&out).contains(&format!("{kind}.tandem.dev")),
            "kubectl apply output names {kind}: {}",
            stdout(&out)
        );
    }

    let out = c
        .kubectl(
            Identity::Admin,
            &["apply", "--server-side", "--force-conflicts", "-f", &dir],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl apply --server-side: {}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("serverside-applied"),
        "{}",
        stdout(&out)
    );

    // The same objects through the Rust client's server-side apply, as an
    // installer built on kube-rs would do it.
    let client = c.client(Identity::Admin).await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for (_, crd) in all_crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("tandem-tests-crd-install").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("server-side apply of {name}: {e}"));
        let established = eventually(
            &format!("{name} to be Established"),
            Duration::from_secs(30),
            || async {
                let got = crds.get(&name).await?;
                let conditions = got.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(conditions
                    .iter()
                    .find(|c| c.type_ == "Established" && c.status == "True")
                    .map(|_| ()))
            },
        )
        .await;
        established.unwrap();
    }
}

#[tokio::test]
async fn a_full_llama_deployment_round_trips() {
    let c = cluster();
    let ns = TestNamespace::new(c, "roundtrip").await.unwrap();
    let client = c.client(Identity::Admin).await.unwrap();
    let api: Api<LlamaDeployment> = Api::namespaced(client, ns.name());

    let want = full_deployment("full");
    let created = api.create(&PostParams::default(), &want).await.unwrap();
    assert_eq!(created.spec, want.spec, "spec as created");
    let generation = created.metadata.generation.unwrap();

    let status = LlamaDeploymentStatus {
        observed_generation: Some(generation),
        phase: Some(DeploymentPhase::Serving),
        epoch: 3,
        world_size: 2,
        ready_ranks: 2,
        ready: Some("2/2".into()),
        ranks: vec![
            RankStatus {
                rank: 0,
                node: "mac-a".into(),
                shard: "full-e3-r0".into(),
                phase: Some(ShardPhase::Ready),
                address: Some("10.1.0.1:40000".into()),
                bytes_done: None,
            },
            RankStatus {
                rank: 1,
                node: "mac-b".into(),
                shard: "full-e3-r1".into(),
                phase: Some(ShardPhase::Ready),
                address: Some("10.1.0.2:40000".into()),
                bytes_done: None,
            },
        ],
        endpoint: Some("https://10.1.0.1:9090".into()),
        ca_bundle: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        valid_world_sizes: vec![1, 2, 4, 8],
        memory_per_rank_bytes: Some(512 * 1024 * 1024),
        conditions: vec![
            condition("GroupFormed", "True", "GroupFormed", generation),
            condition("Placed", "True", "Placed", generation),
            condition("Ready", "True", "Serving", generation),
            condition("ShardsLoaded", "True", "AllLoaded", generation),
        ],
        ..LlamaDeploymentStatus::default()
    };
    api.patch_status(
        "full",
        &PatchParams::apply("tandem-tests").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "LlamaDeployment",
            "status": status,
        })),
    )
    .await
    .unwrap();

    let got = api.get("full").await.unwrap();
    assert_eq!(got.spec, want.spec, "spec after a status write");
    assert_eq!(got.status.as_ref(), Some(&status), "status");
    assert_eq!(
        got.metadata.generation,
        Some(generation),
        "status writes do not bump generation"
    );

    // The same object as YAML through kubectl, the way users write it.
    let yaml = serde_yaml::to_string(&full_deployment("from-yaml")).unwrap();
    let out = c
        .kubectl_stdin(
            Identity::Admin,
            &["apply", "-n", ns.name(), "-f", "-"],
            &yaml,
        )
        .unwrap();
    assert!(out.status.success(), "kubectl apply: {}", stderr(&out));
    let out = c
        .kubectl(
            Identity::Admin,
            &["get", "llama", "from-yaml", "-n", ns.name(), "-o", "json"],
        )
        .unwrap();
    let back: LlamaDeployment = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(back.spec, want.spec, "spec after kubectl apply and get");
}

#[tokio::test]
async fn shards_and_nodes_round_trip_with_status_subresources() {
    let c = cluster();
    let ns = TestNamespace::new(c, "shardnode").await.unwrap();
    let client = c.client(Identity::Admin).await.unwrap();

    let shards: Api<LlamaShard> = Api::namespaced(client.clone(), ns.name());
    let shard = LlamaShard::new(
        "llama-e1-r0",
        LlamaShardSpec {
            deployment: "llama".into(),
            epoch: 1,
            rank: 0,
            world_size: 2,
            node_name: "mac-a".into(),
            model: "mlx-community/Llama-3.2-1B-Instruct-4bit".into(),
            revision: Some("main".into()),
            architecture: architecture(),
            backend: Backend::Ring,
            peers: vec![
                Peer {
                    rank: 0,
                    node: "mac-a".into(),
                    address: "127.0.0.1:40000".into(),
                },
                Peer {
                    rank: 1,
                    node: "mac-b".into(),
                    address: "127.0.0.1:40001".into(),
                },
            ],
            control_address: "127.0.0.1:40002".into(),
            serving_port: Some(8080),
            group_token_secret_ref: SecretKeyRef {
                name: "llama-group-token".into(),
                key: None,
            },
            api_key_secret_ref: None,
            tls_secret_ref: Some(SecretRef {
                name: "llama-tls".into(),
            }),
            max_context_tokens: 8192,
            batching: Some(BatchLimits::default()),
        },
    );
    let created = shards.create(&PostParams::default(), &shard).await.unwrap();
    assert_eq!(created.spec, shard.spec);
    let shard_status = LlamaShardStatus {
        phase: Some(ShardPhase::Loading),
        progress: Some(Progress {
            bytes_done: 1 << 20,
            bytes_total: Some(1 << 30),
        }),
        load_seconds: Some(1.5),
        reason: Some("Loading".into()),
        message: Some("reading weights".into()),
        observed_generation: created.metadata.generation,
    };
    shards
        .patch_status(
            "llama-e1-r0",
            &PatchParams::apply("tandem-tests").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "tandem.dev/v1alpha1", "kind": "LlamaShard", "status": shard_status,
            })),
        )
        .await
        .unwrap();
    let got = shards.get("llama-e1-r0").await.unwrap();
    assert_eq!(got.status, Some(shard_status));

    let nodes: Api<LlamaNode> = Api::all(client);
    let name = unique_name("node-roundtrip");
    let node = LlamaNode::new(
        &name,
        LlamaNodeSpec {
            address: "127.0.0.1".into(),
            unschedulable: false,
        },
    );
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let node_status = LlamaNodeStatus {
        capacity: Some(NodeCapacity {
            memory_bytes: 64 << 30,
            wired_limit_bytes: Some(48 << 30),
            cpu_cores: 12,
            gpu_cores: Some(38),
            gpus: None,
        }),
        allocated_bytes: 1 << 30,
        chip: Some("apple-m4-max".into()),
        os: Some("macos".into()),
        backend: Some("metal".into()),
        mlx_version: Some("0.32.2".into()),
        agent_version: Some("0.1.0".into()),
        conditions: vec![condition("Ready", "True", "AgentReady", 1)],
        shards: vec![NodeShard {
            namespace: ns.name().into(),
            name: "llama-e1-r0".into(),
            rank: 0,
            epoch: 1,
            phase: Some(ShardPhase::Loading),
            memory_bytes: 1 << 30,
        }],
    };
    nodes
        .patch_status(
            &name,
            &PatchParams::apply("tandem-tests").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "tandem.dev/v1alpha1", "kind": "LlamaNode", "status": node_status,
            })),
        )
        .await
        .unwrap();
    let got = nodes.get(&name).await.unwrap();
    assert_eq!(got.status, Some(node_status));
    assert_eq!(got.spec, node.spec);

    // Printer columns of the other two kinds, by short name.
    let out = c
        .kubectl(Identity::Admin, &["get", "lnode", &name])
        .unwrap();
    let header = stdout(&out);
    assert!(
        header.starts_with("NAME") && header.contains("CHIP") && header.contains("apple-m4-max"),
        "kubectl get lnode: {header}{}",
        stderr(&out)
    );
    let out = c
        .kubectl(Identity::Admin, &["get", "lshard", "-n", ns.name()])
        .unwrap();
    let table = stdout(&out);
    assert!(
        table.contains("DEPLOYMENT") && table.contains("RANK") && table.contains("Loading"),
        "kubectl get lshard: {table}{}",
        stderr(&out)
    );
    nodes.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn kubectl_scale_sets_the_world_size() {
    let c = cluster();
    let ns = TestNamespace::new(c, "scale").await.unwrap();
    let client = c.client(Identity::Admin).await.unwrap();
    let api: Api<LlamaDeployment> = Api::namespaced(client, ns.name());
    let mut d = full_deployment("scaled");
    d.spec.sharding.world_size = 2;
    api.create(&PostParams::default(), &d).await.unwrap();

    let out = c
        .kubectl(
            Identity::Admin,
            &["scale", "llama", "scaled", "--replicas=4", "-n", ns.name()],
        )
        .unwrap();
    assert!(out.status.success(), "kubectl scale: {}", stderr(&out));
    let got = api.get("scaled").await.unwrap();
    assert_eq!(got.spec.sharding.world_size, 4);

    // The scale subresource reports ready ranks as its status replicas.
    api.patch_status(
        "scaled",
        &PatchParams::apply("tandem-tests").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "LlamaDeployment",
            "status": {"readyRanks": 3},
        })),
    )
    .await
    .unwrap();
    let scale = api.get_scale("scaled").await.unwrap();
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(4));
    assert_eq!(scale.status.map(|s| s.replicas), Some(3));

    // A scale below the schema's minimum is refused by the API server.
    let out = c
        .kubectl(
            Identity::Admin,
            &["scale", "llama", "scaled", "--replicas=0", "-n", ns.name()],
        )
        .unwrap();
    assert!(!out.status.success(), "scale to 0 must be refused");
    assert_eq!(api.get("scaled").await.unwrap().spec.sharding.world_size, 4);
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let c = cluster();
    let ns = TestNamespace::new(c, "columns").await.unwrap();
    let client = c.client(Identity::Admin).await.unwrap();
    let api: Api<LlamaDeployment> = Api::namespaced(client, ns.name());
    api.create(&PostParams::default(), &full_deployment("cols"))
        .await
        .unwrap();
    api.patch_status(
        "cols",
        &PatchParams::apply("tandem-tests").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "LlamaDeployment",
            "status": {"ready": "1/2", "readyRanks": 1, "phase": "Loading",
                       "endpoint": "http://127.0.0.1:9090"},
        })),
    )
    .await
    .unwrap();

    for what in ["llama", "llamadeployments", "tandem"] {
        let out = c
            .kubectl(Identity::Admin, &["get", what, "-n", ns.name()])
            .unwrap();
        assert!(out.status.success(), "kubectl get {what}: {}", stderr(&out));
        let text = stdout(&out);
        // `kubectl get tandem` prints one table per kind of the category;
        // LlamaNodes are cluster-scoped, so other suites' nodes may show up
        // in a table of their own. Take the deployments' table.
        let table = text
            .split("\n\n")
            .find(|t| t.contains("cols"))
            .unwrap_or_default();
        let mut lines = table.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            header,
            [
                "NAME", "MODEL", "WORLD", "READY", "PHASE", "ENDPOINT", "AGE"
            ],
            "kubectl get {what}"
        );
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            &row[..6],
            [
                if what == "tandem" {
                    "llamadeployment.tandem.dev/cols"
                } else {
                    "cols"
                },
                "example-org/Custom-Llama-1B-4bit",
                "2",
                "1/2",
                "Loading",
                "http://127.0.0.1:9090"
            ],
            "kubectl get {what}: {text}"
        );
    }
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let c = cluster();
    let out = c
        .kubectl(
            Identity::Admin,
            &["explain", "llamadeployment.spec.sharding"],
        )
        .unwrap();
    assert!(out.status.success(), "kubectl explain: {}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "How the model is split into ranks.",
        "worldSize",
        "Number of ranks, one per node.",
        "strategy",
        "Parallelism strategy.",
    ] {
        assert!(
            text.contains(expected),
            "explain lacks {expected:?}:\n{text}"
        );
    }

    for (path, expected) in [
        ("llama.spec.model", "Model ID in the Hugging Face"),
        ("llamashard.spec.peers", "Every rank of the group"),
        ("lnode.status.capacity", "What the machine has."),
        (
            "llama.status.conditions",
            "Placed, ShardsLoaded, GroupFormed and Ready",
        ),
    ] {
        let out = c.kubectl(Identity::Admin, &["explain", path]).unwrap();
        let text = stdout(&out);
        assert!(
            text.contains(expected),
            "kubectl explain {path} lacks {expected:?}:\n{text}{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn the_api_server_rejects_bad_manifests_with_clear_messages() {
    let c = cluster();
    let ns = TestNamespace::new(c, "badspec").await.unwrap();
    // (case, spec body, phrases the API server's answer must contain)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "missing model",
            "sharding: {worldSize: 2}",
            &["spec.model", "Required value"],
        ),
        (
            "missing sharding",
            "model: mlx-community/Llama-3.2-1B-Instruct-4bit",
            &["spec.sharding", "Required value"],
        ),
        (
            "world size zero",
            "model: m/x\nsharding: {worldSize: 0}",
            &[
                "spec.sharding.worldSize",
                "should be greater than or equal to 1",
            ],
        ),
        (
            "negative world size",
            "model: m/x\nsharding: {worldSize: -2}",
            &[
                "spec.sharding.worldSize",
                "should be greater than or equal to 1",
            ],
        ),
        (
            "unknown strategy",
            "model: m/x\nsharding: {worldSize: 2, strategy: Diagonal}",
            &[
                "spec.sharding.strategy",
                "Unsupported value",
                "\"Tensor\"",
                "\"Pipeline\"",
            ],
        ),
        (
            "unknown backend",
            "model: m/x\nsharding: {worldSize: 2}\nbackend: Carrier",
            &[
                "spec.backend",
                "Unsupported value",
                "\"Ring\"",
                "\"Jaccl\"",
                "\"Nccl\"",
            ],
        ),
        (
            "world size as a string",
            "model: m/x\nsharding: {worldSize: \"four\"}",
            &["spec.sharding.worldSize", "must be of type integer"],
        ),
        (
            "model as a number",
            "model: 42\nsharding: {worldSize: 2}",
            &["spec.model", "must be of type string"],
        ),
        (
            "sharding as a list",
            "model: m/x\nsharding: [2]",
            &["spec.sharding", "must be of type object"],
        ),
        (
            "model with spaces",
            "model: \"my model\"\nsharding: {worldSize: 2}",
            &["spec.model", "should match"],
        ),
        (
            "revision that climbs out of the model directory",
            "model: m/x\nrevision: main/../../etc\nsharding: {worldSize: 2}",
            &["spec.revision", "should match"],
        ),
        (
            "context too small",
            "model: m/x\nsharding: {worldSize: 2}\nmaxContextTokens: 16",
            &[
                "spec.maxContextTokens",
                "should be greater than or equal to 128",
            ],
        ),
        (
            "serving port out of range",
            "model: m/x\nsharding: {worldSize: 2}\nserving: {port: 70000}",
            &["spec.serving.port", "should be less than or equal to 65535"],
        ),
        (
            "batch of no sequences",
            "model: m/x\nsharding: {worldSize: 2}\nserving: {maxBatchSequences: 0}",
            &[
                "spec.serving.maxBatchSequences",
                "should be greater than or equal to 1",
            ],
        ),
        (
            "prefill chunk too small",
            "model: m/x\nsharding: {worldSize: 2}\nserving: {prefillChunkTokens: 8}",
            &[
                "spec.serving.prefillChunkTokens",
                "should be greater than or equal to 16",
            ],
        ),
        (
            "negative prefix cache",
            "model: m/x\nsharding: {worldSize: 2}\nserving: {prefixCacheBytes: -1}",
            &[
                "spec.serving.prefixCacheBytes",
                "should be greater than or equal to 0",
            ],
        ),
        (
            "quantization bits out of range",
            "model: m/x\nsharding: {worldSize: 2}\narchitecture: {numHiddenLayers: 2, hiddenSize: 64, numAttentionHeads: 4, numKeyValueHeads: 2, intermediateSize: 128, vocabSize: 256, quantization: {bits: 16, groupSize: 64}}",
            &[
                "spec.architecture.quantization.bits",
                "should be less than or equal to 8",
            ],
        ),
    ];

    let mut failures = Vec::new();
    for (i, (case, spec, phrases)) in cases.iter().enumerate() {
        let name = format!("bad-{i}");
        let indented = spec.replace('\n', "\n  ");
        let manifest = format!(
            "apiVersion: tandem.dev/v1alpha1\nkind: LlamaDeployment\nmetadata:\n  name: {name}\nspec:\n  {indented}\n"
        );
        // --validate=false: the API server itself must refuse, not kubectl.
        let out = c
            .kubectl_stdin(
                Identity::Admin,
                &["create", "--validate=false", "-n", ns.name(), "-f", "-"],
                &manifest,
            )
            .unwrap();
        let message = stderr(&out);
        if out.status.success() {
            failures.push(format!("{case}: accepted"));
            continue;
        }
        for phrase in phrases.iter() {
            if !message.contains(phrase) {
                failures.push(format!("{case}: message lacks {phrase:?}: {message}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let out = c
        .kubectl(
            Identity::Admin,
            &["get", "llama", "-n", ns.name(), "-o", "name"],
        )
        .unwrap();
    assert_eq!(stdout(&out).trim(), "", "nothing was stored");
}

#[tokio::test]
async fn each_identity_has_exactly_the_charts_rights() {
    let c = cluster();
    // The operator of the release `tandem`, which watches every namespace:
    // (verb, resource, subresource, allowed).
    let checks = [
        ("create", "llamashards.tandem.dev", "", true),
        ("delete", "llamashards.tandem.dev", "", true),
        ("update", "llamashards.tandem.dev", "", false),
        ("deletecollection", "llamashards.tandem.dev", "", false),
        ("patch", "llamadeployments.tandem.dev", "status", true),
        ("update", "llamadeployments.tandem.dev", "finalizers", true),
        ("update", "llamadeployments.tandem.dev", "", false),
        ("delete", "llamadeployments.tandem.dev", "", false),
        // Held only so that it may grant it to agents in per-node Roles.
        ("patch", "llamashards.tandem.dev", "status", true),
        ("create", "secrets", "", true),
        ("get", "secrets", "", true),
        ("update", "secrets", "", false),
        ("delete", "secrets", "", false),
        ("create", "roles.rbac.authorization.k8s.io", "", true),
        ("delete", "rolebindings.rbac.authorization.k8s.io", "", true),
        (
            "create",
            "clusterroles.rbac.authorization.k8s.io",
            "",
            false,
        ),
        ("escalate", "roles.rbac.authorization.k8s.io", "", false),
        ("bind", "roles.rbac.authorization.k8s.io", "", false),
        ("watch", "llamanodes.tandem.dev", "", true),
        ("create", "llamanodes.tandem.dev", "", false),
        ("patch", "llamanodes.tandem.dev", "", false),
        ("create", "pods", "", false),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, subresource, allowed) in checks {
        let mut args = vec!["auth", "can-i", verb, resource, "--all-namespaces"];
        let flag = format!("--subresource={subresource}");
        if !subresource.is_empty() {
            args.push(&flag);
        }
        let out = c.kubectl(Identity::Operator, &args).unwrap();
        let answer = stdout(&out).trim().to_string();
        if (answer == "yes") != allowed {
            wrong.push(format!(
                "operator {verb} {resource} {subresource}: {answer}"
            ));
        }
    }
    // Leases only in the system namespace, and never patched.
    for (verb, ns, allowed) in [
        ("update", "tandem-system", true),
        ("patch", "tandem-system", false),
        ("update", "default", false),
    ] {
        let out = c
            .kubectl(
                Identity::Operator,
                &["auth", "can-i", verb, "leases", "-n", ns],
            )
            .unwrap();
        let answer = stdout(&out).trim().to_string();
        if (answer == "yes") != allowed {
            wrong.push(format!("operator {verb} leases in {ns}: {answer}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "RBAC differs from the chart's intent:\n{}",
        wrong.join("\n")
    );

    // A joined node's agent may neither create deployments nor read
    // Secrets in general: real requests, not only the authorizer's opinion.
    let node = unique_name("node-rbac");
    let agent = c.node_client(&node, "127.0.0.1").await.unwrap();
    let deployments: Api<LlamaDeployment> = Api::namespaced(agent.clone(), "default");
    let err = deployments
        .create(&PostParams::default(), &full_deployment("agent-made"))
        .await
        .expect_err("the agent may not create deployments");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403
            && s.message.contains("cannot create resource \"llamadeployments\"")),
        "expected 403 Forbidden, got {err}"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(agent, tandem_tests::SYSTEM_NAMESPACE);
    let err = secrets
        .list(&Default::default())
        .await
        .expect_err("the agent may not list Secrets");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403
            && s.message.contains("cannot list resource \"secrets\"")),
        "expected 403 Forbidden, got {err}"
    );
    c.forget_node(&node);
}

#[tokio::test]
async fn deleting_an_owner_cascades_to_its_shards() {
    // Proves the control plane's garbage collector runs: the operator relies
    // on it to remove shards and Secrets of deleted deployments.
    let c = cluster();
    let ns = TestNamespace::new(c, "cascade").await.unwrap();
    let client = c.client(Identity::Admin).await.unwrap();
    let deployments: Api<LlamaDeployment> = Api::namespaced(client.clone(), ns.name());
    let owner = deployments
        .create(&PostParams::default(), &full_deployment("owner"))
        .await
        .unwrap();
    let shards: Api<LlamaShard> = Api::namespaced(client.clone(), ns.name());
    let mut shard: LlamaShard = serde_json::from_value(serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "LlamaShard",
        "metadata": {"name": "owner-e1-r0"},
        "spec": {
            "deployment": "owner", "epoch": 1, "rank": 0, "worldSize": 1, "nodeName": "n",
            "model": "m/x", "architecture": architecture(), "peers": [],
            "controlAddress": "127.0.0.1:1", "groupTokenSecretRef": {"name": "t"}
        }
    }))
    .unwrap();
    shard.metadata.owner_references = Some(vec![OwnerReference {
        api_version: LlamaDeployment::api_version(&()).into(),
        kind: LlamaDeployment::kind(&()).into(),
        name: owner.name_any(),
        uid: owner.uid().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    shards.create(&PostParams::default(), &shard).await.unwrap();

    deployments
        .delete("owner", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually(
        "the shard to be garbage-collected",
        Duration::from_secs(60),
        || async { Ok(shards.get_opt("owner-e1-r0").await?.is_none().then_some(())) },
    )
    .await
    .unwrap();
    eventually("the owner to be gone", Duration::from_secs(60), || async {
        Ok(deployments.get_opt("owner").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_deleted_namespace_is_emptied_and_removed() {
    // Proves the namespace controller runs, which per-test cleanup relies on.
    let c = cluster();
    let client = c.client(Identity::Admin).await.unwrap();
    let ns = TestNamespace::new(c, "nsdelete").await.unwrap();
    let api: Api<LlamaDeployment> = Api::namespaced(client.clone(), ns.name());
    api.create(&PostParams::default(), &full_deployment("doomed"))
        .await
        .unwrap();
    let name = ns.name().to_string();
    drop(ns);
    let namespaces: Api<Namespace> = Api::all(client);
    eventually(
        "the namespace to be removed",
        Duration::from_secs(90),
        || async { Ok(namespaces.get_opt(&name).await?.is_none().then_some(())) },
    )
    .await
    .unwrap();
}
