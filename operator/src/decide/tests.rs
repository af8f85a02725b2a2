//! Fixture tests of the reconcile decision: a small in-memory world plays
//! the API server (it applies the outcome) and the agents (they set shard
//! phases), and each test walks a deployment through a scenario.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tandem_crds::{
    BatchLimits, DeploymentPhase, LlamaDeployment, LlamaDeploymentStatus, LlamaShard,
    LlamaShardStatus, Serving, ShardPhase, ShardingStrategy,
};
use tandem_planner::{NodeInfo, PortRange, ServingBudget, lookup_model, memory_per_rank};

use super::failures::{LATE, Mention, STOPPED, clip, mentions, rank_list, without_retry_note};
use super::*;
use crate::conditions::{self, GROUP_FORMED, PLACED, READY, SHARDS_LOADED};
use crate::fixtures::{MODEL_1B, deployment, ts};
use crate::objects::owner_reference;
use crate::observe::HeldShard;

const GIB: u64 = 1 << 30;

fn ninfo(name: &str, last_octet: u8, gib: u64) -> NodeInfo {
    NodeInfo {
        name: name.to_owned(),
        address: format!("10.0.0.{last_octet}"),
        labels: [("tandem.dev/chip".to_owned(), "cpu".to_owned())].into(),
        ready: true,
        unschedulable: false,
        capacity_bytes: gib * GIB,
        allocated_bytes: 0,
        port_range: PortRange {
            first: 47000,
            last: 47999,
        },
        used_ports: Default::default(),
    }
}

fn settings() -> Settings {
    Settings {
        restart: RestartPolicy {
            budget: 3,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            reset_after: Duration::from_secs(600),
        },
        release_timeout: Duration::from_secs(120),
        resync: Duration::from_secs(300),
        load_timeout: Duration::from_secs(600),
    }
}

/// The API server and the agents, in memory.
struct World {
    d: LlamaDeployment,
    nodes: Vec<NodeInfo>,
    /// Nodes that cannot run the deployment's backend, with why.
    mismatched: BTreeMap<String, String>,
    shards: Vec<LlamaShard>,
    status: LlamaDeploymentStatus,
    settings: Settings,
}

impl World {
    fn new(world: i32, nodes: Vec<NodeInfo>) -> Self {
        World {
            d: deployment("llama", MODEL_1B, world),
            nodes,
            mismatched: BTreeMap::new(),
            shards: Vec::new(),
            status: LlamaDeploymentStatus::default(),
            settings: settings(),
        }
    }

    /// One reconcile at `now`; its writes land.
    fn step(&mut self, now: i64) -> Outcome {
        let owner = owner_reference(&self.d).expect("uid");
        let refs: Vec<&LlamaShard> = self.shards.iter().collect();
        let out = reconcile(
            &ReconcileInput {
                deployment: &self.d,
                owner: &owner,
                prior: &self.status,
                shards: &refs,
                nodes: &self.nodes,
                mismatched: &self.mismatched,
                now: ts(now),
            },
            &self.settings,
        );
        self.shards.retain(|s| !out.delete.contains(&s.name_any()));
        self.shards.extend(out.apply.iter().cloned());
        self.status = out.status.clone();
        out
    }

    fn edit(&mut self, f: impl FnOnce(&mut LlamaDeployment)) {
        f(&mut self.d);
        self.d.metadata.generation = self.d.metadata.generation.map(|g| g + 1);
    }

    /// The agents report `phase` for every shard of the current epoch.
    fn all(&mut self, phase: ShardPhase) {
        let epoch = self.status.epoch;
        for s in self.shards.iter_mut().filter(|s| s.spec.epoch == epoch) {
            s.status = Some(LlamaShardStatus {
                phase: Some(phase),
                ..Default::default()
            });
        }
    }

    fn rank(&mut self, rank: i32) -> &mut LlamaShard {
        let epoch = self.status.epoch;
        self.shards
            .iter_mut()
            .find(|s| s.spec.epoch == epoch && s.spec.rank == rank)
            .expect("rank")
    }

    fn node(&mut self, name: &str) -> &mut NodeInfo {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node")
    }

    fn placement(&self) -> Vec<(i32, String)> {
        let mut v: Vec<(i32, String)> = self
            .shards
            .iter()
            .filter(|s| s.spec.epoch == self.status.epoch)
            .map(|s| (s.spec.rank, s.spec.node_name.clone()))
            .collect();
        v.sort();
        v
    }

    fn condition(&self, type_: &str) -> (String, String, String) {
        let c = conditions::find(&self.status.conditions, type_).expect("condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }
}

fn reasons(out: &Outcome) -> Vec<String> {
    out.notices.iter().map(|n| n.reason.clone()).collect()
}

fn nodes(n: u8) -> Vec<NodeInfo> {
    (1..=n).map(|i| ninfo(&format!("n{i}"), i, 64)).collect()
}

#[test]
fn first_placement_writes_one_shard_per_rank_with_peers_and_a_token() {
    let mut w = World::new(2, nodes(2));
    let out = w.step(100);
    assert_eq!(out.new_epoch, Some(EpochCause::Initial));
    assert_eq!(out.apply.len(), 2);
    assert_eq!(out.token_epoch, Some(1));
    assert!(out.delete.is_empty());
    let s = &w.status;
    assert_eq!(s.epoch, 1);
    assert_eq!(s.phase, Some(DeploymentPhase::Loading));
    assert_eq!(s.world_size, 2);
    assert_eq!(s.ready.as_deref(), Some("0/2"));
    assert_eq!(s.valid_world_sizes, vec![1, 2, 4, 8]);
    let shape = lookup_model(MODEL_1B).expect("1b").shape;
    // Weights, a KV cache for the default 32768-token batch and the default
    // 512 MiB prefix cache.
    let budget = ServingBudget::batched(8192, 32768, 512 << 20);
    assert_eq!(
        s.memory_per_rank_bytes,
        Some(memory_per_rank(&shape, 2, budget).total() as i64)
    );
    assert!(
        out.apply
            .iter()
            .all(|sh| sh.spec.batching == Some(BatchLimits::default()))
    );
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.ranks.len(), 2);
    assert_eq!(s.ranks[0].shard, "llama-e1-r0");
    let peers = &out.apply[1].spec.peers;
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[0].address, out.apply[0].spec.peers[0].address);
    assert_eq!(
        out.apply[1].spec.control_address,
        out.apply[0].spec.control_address
    );
    assert_eq!(w.condition(PLACED).0, "True");
    assert!(
        w.condition(PLACED).2.starts_with("epoch 1: rank 0 on n1"),
        "{:?}",
        w.condition(PLACED)
    );
    assert_eq!(w.condition(READY).1, "Loading");
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(1))
    );
    assert_eq!(reasons(&out), ["Placed"]);
}

#[test]
fn progress_goes_loading_forming_serving_with_an_endpoint() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.rank(0).status = Some(LlamaShardStatus {
        phase: Some(ShardPhase::Downloading),
        progress: Some(tandem_crds::Progress {
            bytes_done: 50,
            bytes_total: Some(200),
        }),
        ..Default::default()
    });
    let out = w.step(101);
    assert!(out.apply.is_empty() && out.new_epoch.is_none());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Loading));
    assert!(
        w.condition(SHARDS_LOADED)
            .2
            .contains("rank 0 on n1: Downloading 25%"),
        "{:?}",
        w.condition(SHARDS_LOADED)
    );
    assert!(
        out.notices.is_empty(),
        "no transition, no Event: {:?}",
        out.notices
    );

    // Agents meet at the barrier before they load (docs/design.md).
    w.all(ShardPhase::Connecting);
    w.step(102);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Loading));
    assert_eq!(w.condition(GROUP_FORMED).1, "Connecting");
    w.all(ShardPhase::Loading);
    w.step(103);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Loading));
    assert_eq!(w.condition(GROUP_FORMED).0, "True");
    assert_eq!(w.condition(SHARDS_LOADED).0, "False");
    w.all(ShardPhase::Loaded);
    w.step(104);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Forming));
    assert_eq!(w.condition(SHARDS_LOADED).0, "True");
    assert_eq!(w.condition(READY).1, "Forming");

    w.all(ShardPhase::Ready);
    let out = w.step(105);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Serving));
    assert_eq!(w.status.ready_ranks, 2);
    assert_eq!(w.status.ready.as_deref(), Some("2/2"));
    assert_eq!(w.status.endpoint.as_deref(), Some("https://10.0.0.1:8080"));
    assert_eq!(w.condition(READY).0, "True");
    assert_eq!(reasons(&out), ["Serving"]);
    let ready = conditions::find(&w.status.conditions, READY).expect("ready");
    assert_eq!(ready.last_transition_time.0, ts(105));
    let placed = conditions::find(&w.status.conditions, PLACED).expect("placed");
    assert_eq!(
        placed.last_transition_time.0,
        ts(100),
        "Placed never flipped"
    );
}

#[test]
fn scaling_up_keeps_the_nodes_and_starts_a_new_epoch() {
    let mut w = World::new(2, nodes(4));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    let before = w.placement();
    w.edit(|d| d.spec.sharding.world_size = 4);
    let out = w.step(102);
    assert_eq!(out.new_epoch, Some(EpochCause::Scale { from: 2, to: 4 }));
    assert_eq!(out.delete, ["llama-e1-r0", "llama-e1-r1"]);
    assert_eq!(w.status.epoch, 2);
    assert_eq!(out.token_epoch, Some(2), "the token rotates");
    let after = w.placement();
    assert_eq!(after.len(), 4);
    assert_eq!(
        &after[..2],
        &before[..],
        "ranks 0 and 1 stay on their nodes"
    );
    assert_eq!(w.status.ready.as_deref(), Some("0/4"));
    assert_eq!(reasons(&out), ["Scaling"]);
    assert!(
        w.shards
            .iter()
            .all(|s| s.spec.epoch == 2 && s.spec.world_size == 4)
    );

    // And down to 1: rank 0 stays.
    w.all(ShardPhase::Ready);
    w.step(103);
    w.edit(|d| d.spec.sharding.world_size = 1);
    let out = w.step(104);
    assert_eq!(out.new_epoch, Some(EpochCause::Scale { from: 4, to: 1 }));
    assert_eq!(w.placement(), vec![(0, before[0].1.clone())]);
    assert_eq!(out.delete.len(), 4);
}

#[test]
fn bad_specs_give_a_condition_and_an_event_and_no_shards() {
    type Edit = fn(&mut LlamaDeployment);
    let cases: [(&str, Edit, u8, &str, DeploymentPhase); 6] = [
        (
            "InvalidSharding",
            |d| d.spec.sharding.world_size = 3,
            4,
            "valid world sizes: 1, 2, 4, 8",
            DeploymentPhase::Failed,
        ),
        (
            "UnknownModel",
            |d| d.spec.model = "me/unknown".into(),
            4,
            "spec.architecture",
            DeploymentPhase::Failed,
        ),
        (
            "NoMatchingNodes",
            |d| d.spec.sharding.world_size = 8,
            4,
            "scale to 4",
            DeploymentPhase::Placing,
        ),
        (
            "InsufficientMemory",
            |_| {},
            0,
            "free memory",
            DeploymentPhase::Placing,
        ),
        (
            "InvalidSharding",
            |d| d.spec.sharding.strategy = ShardingStrategy::Pipeline,
            4,
            "Pipeline is reserved",
            DeploymentPhase::Failed,
        ),
        (
            "InvalidServing",
            |d| {
                d.spec.serving = Some(Serving {
                    max_batch_tokens: Some(4096),
                    ..Serving::default()
                })
            },
            4,
            "set maxBatchTokens to at least 8192",
            DeploymentPhase::Failed,
        ),
    ];
    for (reason, edit, node_count, hint, phase) in cases {
        let mut ns = nodes(node_count.max(2));
        if node_count == 0 {
            for n in &mut ns {
                n.capacity_bytes = GIB / 4;
            }
        }
        let mut w = World::new(2, ns);
        edit(&mut w.d);
        let out = w.step(100);
        assert!(out.apply.is_empty(), "{reason}: no shards");
        assert_eq!(out.token_epoch, None, "{reason}: no token");
        assert_eq!(w.status.phase, Some(phase), "{reason}");
        let (status, got, message) = w.condition(PLACED);
        assert_eq!(
            (status.as_str(), got.as_str()),
            ("False", reason),
            "{message}"
        );
        assert!(
            message.contains(hint),
            "{reason}: {message:?} lacks {hint:?}"
        );
        assert_eq!(w.condition(READY).1, reason);
        let notice = out
            .notices
            .iter()
            .find(|n| n.reason == reason)
            .expect("event");
        assert_eq!(notice.severity, Severity::Warning);
        assert_eq!(notice.note, message);
        // Nothing changes: no new Event.
        let again = w.step(101);
        assert!(again.notices.is_empty(), "{reason}: {:?}", again.notices);
    }
}

#[test]
fn an_impossible_edit_leaves_the_serving_group_alone() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    w.edit(|d| d.spec.sharding.world_size = 3);
    let out = w.step(102);
    assert!(out.apply.is_empty() && out.delete.is_empty());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Serving));
    assert_eq!(w.status.epoch, 1);
    let (status, reason, message) = w.condition(PLACED);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidSharding")
    );
    assert!(message.contains("keeps running"), "{message}");
    assert_eq!(reasons(&out), ["InvalidSharding"]);
    // A fix lets it scale.
    w.edit(|d| d.spec.sharding.world_size = 1);
    let out = w.step(103);
    assert_eq!(out.new_epoch, Some(EpochCause::Scale { from: 2, to: 1 }));
}

#[test]
fn changed_batch_limits_start_a_new_epoch_and_bad_ones_leave_the_group_alone() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);

    // Limits that cannot work: refused, and the serving group keeps running.
    w.edit(|d| {
        d.spec.serving = Some(Serving {
            max_batch_tokens: Some(1024),
            ..Serving::default()
        })
    });
    let out = w.step(102);
    assert!(out.apply.is_empty() && out.delete.is_empty());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Serving));
    let (status, reason, message) = w.condition(PLACED);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidServing")
    );
    assert!(message.contains("keeps running"), "{message}");
    assert_eq!(reasons(&out), ["InvalidServing"]);
    assert_eq!(
        w.status.memory_per_rank_bytes, None,
        "no estimate for a bad spec"
    );

    // Limits that work are a spec change like any other: a new epoch whose
    // shards carry them, and a memory estimate that counts them.
    w.edit(|d| {
        d.spec.serving = Some(Serving {
            max_batch_sequences: Some(16),
            max_batch_tokens: Some(65536),
            prefix_cache_bytes: Some(0),
            ..Serving::default()
        })
    });
    let out = w.step(103);
    assert_eq!(out.new_epoch, Some(EpochCause::SpecChange));
    let want = BatchLimits {
        max_sequences: 16,
        max_tokens: 65536,
        prefill_chunk_tokens: 2048,
        prefix_cache_bytes: 0,
        max_completion_tokens: 4096,
    };
    assert!(out.apply.iter().all(|s| s.spec.batching == Some(want)));
    assert_eq!(out.delete.len(), 2);
    let shape = lookup_model(MODEL_1B).expect("1b").shape;
    let budget = ServingBudget::batched(8192, 65536, 0);
    assert_eq!(
        w.status.memory_per_rank_bytes,
        Some(memory_per_rank(&shape, 2, budget).total() as i64)
    );
    // The same limits again: nothing to do.
    w.all(ShardPhase::Ready);
    assert!(w.step(104).new_epoch.is_none());
}

#[test]
fn a_lost_node_degrades_then_the_rank_moves_away_from_it() {
    let mut w = World::new(2, nodes(3));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    let before = w.placement();
    let lost = before[1].1.clone();
    w.node(&lost).ready = false;
    let out = w.step(110);
    // The first restart is immediate.
    let Some(EpochCause::Restart { reason, message }) = &out.new_epoch else {
        panic!("expected a restart, got {:?}", out.new_epoch);
    };
    assert_eq!(*reason, "NodeLost");
    assert!(message.contains(&lost), "{message}");
    let after = w.placement();
    assert_eq!(after[0], before[0], "rank 0 stays");
    assert_ne!(after[1].1, lost, "rank 1 moves off the lost node");
    assert_eq!(w.status.epoch, 2);
    assert_eq!(w.status.restart_count, 1);
    let record = w.status.last_restart.clone().expect("record");
    assert_eq!((record.epoch, record.reason.as_str()), (2, "NodeLost"));
    assert_eq!(w.status.phase, Some(DeploymentPhase::Degraded));
    assert_eq!(w.condition(READY).1, "Recovering");
    assert_eq!(reasons(&out), ["Restarting", "Degraded"]);
    assert_eq!(out.notices[0].severity, Severity::Warning);

    // Degraded until the new group serves.
    w.all(ShardPhase::Loaded);
    w.step(111);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Degraded));
    w.all(ShardPhase::Ready);
    let out = w.step(112);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Serving));
    assert_eq!(reasons(&out), ["Serving"]);
}

#[test]
fn a_failed_rank_restarts_in_place_with_backoff_and_a_budget() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    let placement = w.placement();
    let fail = |w: &mut World| {
        w.rank(1).status = Some(LlamaShardStatus {
            phase: Some(ShardPhase::Failed),
            reason: Some("OutOfMemory".into()),
            message: Some("cannot allocate".into()),
            ..Default::default()
        });
    };
    fail(&mut w);
    let out = w.step(102);
    assert!(matches!(
        out.new_epoch,
        Some(EpochCause::Restart {
            reason: "RankFailed",
            ..
        })
    ));
    assert_eq!(w.placement(), placement, "same nodes: nothing else fits");
    assert!(
        out.notices[0].note.contains("OutOfMemory: cannot allocate"),
        "{}",
        out.notices[0].note
    );

    // It fails again at once: the second restart waits 10 s.
    fail(&mut w);
    let out = w.step(105);
    assert!(out.new_epoch.is_none() && out.apply.is_empty());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Degraded));
    assert_eq!(out.requeue_after, Duration::from_secs(7));
    let (_, reason, message) = w.condition(READY);
    assert_eq!(reason, "RankFailed");
    assert!(message.contains("restart 2 of 3"), "{message}");
    assert_eq!(
        reasons(&out),
        ["RankFailed"],
        "Placed turned False; the phase stays Degraded"
    );
    let out = w.step(112);
    assert!(out.new_epoch.is_some());
    assert_eq!(w.status.restart_count, 2);

    // Third restart after 20 s more, then the budget (3) is spent.
    fail(&mut w);
    assert!(w.step(131).new_epoch.is_none());
    assert!(w.step(132).new_epoch.is_some());
    assert_eq!(w.status.restart_count, 3);
    fail(&mut w);
    let out = w.step(200);
    assert!(out.new_epoch.is_none() && out.apply.is_empty());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Failed));
    let (_, reason, message) = w.condition(READY);
    assert_eq!(reason, "RestartBudgetExhausted");
    assert!(message.contains("OutOfMemory"), "{message}");
    assert!(reasons(&out).contains(&"Failed".to_owned()));

    // Editing the spec gives a fresh budget.
    w.edit(|d| d.spec.max_context_tokens = 4096);
    let out = w.step(201);
    assert!(matches!(out.new_epoch, Some(EpochCause::Restart { .. })));
    assert_eq!(w.status.restart_count, 1);
}

#[test]
fn the_budget_resets_after_serving_long_enough() {
    let mut w = World::new(1, nodes(1));
    w.step(100);
    w.all(ShardPhase::Failed);
    w.step(101);
    assert_eq!(w.status.restart_count, 1);
    w.all(ShardPhase::Ready);
    w.step(102);
    assert_eq!(w.status.restart_count, 1);
    // Serving for 10 minutes: the next failure is a first restart again.
    w.all(ShardPhase::Failed);
    let out = w.step(102 + 600);
    assert!(out.new_epoch.is_some());
    assert_eq!(w.status.restart_count, 1);
}

#[test]
fn without_capacity_it_waits_and_recovers_when_a_node_appears() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    w.node("n2").ready = false;
    let out = w.step(110);
    assert!(out.apply.is_empty());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Degraded));
    let (_, placed_reason, _) = w.condition(PLACED);
    assert_eq!(placed_reason, "NoMatchingNodes");
    let (_, ready_reason, ready_message) = w.condition(READY);
    assert_eq!(ready_reason, "NodeLost");
    assert!(
        ready_message.contains("waiting for capacity"),
        "{ready_message}"
    );
    assert_eq!(reasons(&out), ["NoMatchingNodes", "Degraded"]);
    assert_eq!(w.status.restart_count, 0, "waiting costs no budget");

    w.nodes.push(ninfo("n3", 3, 64));
    let out = w.step(120);
    assert!(matches!(
        out.new_epoch,
        Some(EpochCause::Restart {
            reason: "NodeLost",
            ..
        })
    ));
    assert_eq!(
        w.placement(),
        vec![(0, "n1".to_owned()), (1, "n3".to_owned())]
    );
}

#[test]
fn cordoned_nodes_get_no_new_ranks() {
    let mut ns = nodes(3);
    ns[0].unschedulable = true;
    ns[0].capacity_bytes = 512 * GIB;
    let mut w = World::new(2, ns);
    w.step(100);
    assert!(w.placement().iter().all(|(_, n)| n != "n1"));
}

#[test]
fn a_half_written_unrecorded_epoch_is_replaced_without_a_restart() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    // The status write of epoch 1 was lost, and only rank 0 was stored.
    w.status = LlamaDeploymentStatus::default();
    w.shards.retain(|s| s.spec.rank == 0);
    let out = w.step(101);
    assert_eq!(out.new_epoch, Some(EpochCause::Replace));
    assert_eq!(out.delete, ["llama-e1-r0"]);
    assert_eq!(w.status.epoch, 2);
    assert_eq!(w.status.restart_count, 0);

    // The status write failed but every shard landed: the epoch is adopted.
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.status = LlamaDeploymentStatus::default();
    let out = w.step(101);
    assert!(out.new_epoch.is_none() && out.apply.is_empty());
    assert_eq!(w.status.epoch, 1);
}

#[test]
fn a_deleted_shard_of_a_recorded_epoch_is_a_failure() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.shards.retain(|s| s.spec.rank == 0);
    let out = w.step(101);
    assert!(matches!(
        out.new_epoch,
        Some(EpochCause::Restart {
            reason: "ShardMissing",
            ..
        })
    ));
}

#[test]
fn stale_epochs_are_deleted() {
    let mut w = World::new(1, nodes(1));
    w.step(100);
    let mut old = w.shards[0].clone();
    old.metadata.name = Some("llama-e0-r0".into());
    old.spec.epoch = 0;
    w.shards.push(old);
    let out = w.step(101);
    assert_eq!(out.delete, ["llama-e0-r0"]);
    assert!(out.new_epoch.is_none());
}

fn deleting(w: &mut World) {
    w.d.metadata.deletion_timestamp = Some(Time(ts(200)));
}

fn held(name: &str, node: &str) -> HeldShard {
    HeldShard {
        name: name.into(),
        node: node.into(),
        phase: Some(ShardPhase::Terminating),
    }
}

fn run_cleanup(w: &World, shards: &[LlamaShard], held: &[HeldShard], now: i64) -> CleanupOutcome {
    let refs: Vec<&LlamaShard> = shards.iter().collect();
    cleanup(
        &CleanupInput {
            deployment: &w.d,
            prior: &w.status,
            shards: &refs,
            held,
            now: ts(now),
        },
        &w.settings,
    )
}

fn serving_world() -> World {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    deleting(&mut w);
    w
}

#[test]
fn deletion_deletes_shards_then_waits_until_nodes_stop_reporting_them() {
    let w = serving_world();
    let shards = w.shards.clone();
    let out = run_cleanup(&w, &shards, &[], 201);
    assert_eq!(out.delete, ["llama-e1-r0", "llama-e1-r1"]);
    assert!(!out.done, "the objects are still there");
    assert_eq!(out.status.phase, Some(DeploymentPhase::Terminating));
    assert!(out.notices.iter().any(|n| n.reason == "Terminating"));

    // The objects are gone; node n2's agent is still unloading its rank.
    let still = [held("llama-e1-r1", "n2")];
    let out = run_cleanup(&w, &[], &still, 202);
    assert!(out.delete.is_empty());
    assert!(!out.done);
    let ready = conditions::find(&out.status.conditions, READY).expect("ready");
    assert_eq!(ready.reason, "Terminating");
    assert!(
        ready
            .message
            .contains("waiting for agents to release 1 shards: llama-e1-r1 (node n2, Terminating)"),
        "{}",
        ready.message
    );
    assert!(out.requeue_after <= Duration::from_secs(2));

    let out = run_cleanup(&w, &[], &[], 203);
    assert!(out.done);
    assert!(out.notices.iter().all(|n| n.reason != "ReleaseTimedOut"));
}

#[test]
fn deletion_gives_up_waiting_after_the_timeout() {
    let w = serving_world();
    let still = [held("llama-e1-r0", "n1")];
    assert!(!run_cleanup(&w, &[], &still, 250).done);
    let out = run_cleanup(&w, &[], &still, 320);
    assert!(out.done);
    let notice = out
        .notices
        .iter()
        .find(|n| n.reason == "ReleaseTimedOut")
        .expect("event");
    assert!(notice.note.contains("llama-e1-r0"), "{}", notice.note);
    assert_eq!(notice.severity, Severity::Warning);
}

#[test]
fn nccl_waits_for_cuda_nodes_with_free_gpus_and_says_so() {
    let mut w = World::new(2, nodes(3));
    w.d.spec.backend = tandem_crds::Backend::Nccl;
    w.mismatched = [
        ("n1".to_owned(), "n1 runs cpu".to_owned()),
        (
            "n2".to_owned(),
            "n2 has all 1 GPU taken by other Nccl ranks".to_owned(),
        ),
    ]
    .into();
    let out = w.step(100);
    assert!(out.apply.is_empty());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Placing));
    let (status, reason, message) = w.condition(PLACED);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "BackendUnavailable")
    );
    assert!(
        message.contains(
            "1 of 3 registered nodes qualify (n1 runs cpu, n2 has all 1 GPU taken by other \
             Nccl ranks), but 2 ranks were requested"
        ),
        "{message}"
    );
    assert!(message.contains("--backend cuda"), "{message}");
    assert_eq!(reasons(&out), ["BackendUnavailable", "Placing"]);

    // The other deployment lets go of n2's GPU: the group goes to n2 and n3,
    // never to the CPU node.
    w.mismatched.remove("n2");
    let out = w.step(110);
    assert_eq!(out.new_epoch, Some(EpochCause::Initial));
    assert_eq!(
        w.placement(),
        vec![(0, "n2".to_owned()), (1, "n3".to_owned())]
    );
    assert!(
        out.apply
            .iter()
            .all(|s| s.spec.backend == tandem_crds::Backend::Nccl)
    );

    // A node that stops qualifying loses its rank to one that does.
    w.nodes.push(ninfo("n4", 4, 64));
    w.mismatched.insert("n3".into(), "n3 runs cpu".into());
    let out = w.step(120);
    assert_eq!(out.new_epoch, Some(EpochCause::SpecChange));
    assert_eq!(
        w.placement(),
        vec![(0, "n2".to_owned()), (1, "n4".to_owned())]
    );
}

fn demo_nodes() -> Vec<NodeInfo> {
    ["demo-a", "demo-b", "demo-c", "demo-d"]
        .iter()
        .zip(1..)
        .map(|(name, octet)| ninfo(name, octet, 64))
        .collect()
}

/// Four ranks serving on demo-a..demo-d, with a budget of 5.
fn serving_on_demo() -> World {
    let mut w = World::new(4, demo_nodes());
    w.settings.restart.budget = 5;
    w.step(100);
    w.all(ShardPhase::Ready);
    w.step(101);
    assert_eq!(
        w.placement(),
        vec![
            (0, "demo-a".to_owned()),
            (1, "demo-b".to_owned()),
            (2, "demo-c".to_owned()),
            (3, "demo-d".to_owned()),
        ]
    );
    w
}

fn failed(reason: &str, message: &str) -> Option<LlamaShardStatus> {
    Some(LlamaShardStatus {
        phase: Some(ShardPhase::Failed),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..Default::default()
    })
}

const CLOSED: &str = "rank 0 closed the job stream (the group broke or rank 0 stopped); \
                      restarting in 1s (restart 1)";

fn restart_message(out: &Outcome) -> (&'static str, String) {
    match &out.new_epoch {
        Some(EpochCause::Restart { reason, message }) => (reason, message.clone()),
        other => panic!("expected a restart, got {other:?}"),
    }
}

#[test]
fn a_killed_agent_is_named_once_and_first() {
    // demo-b's agent is killed: its rank still reads Ready (nobody writes
    // for it) and its node is ready until the Lease expires. Rank 0 has
    // already restarted its worker; ranks 2 and 3 lost rank 0's stream.
    let mut w = serving_on_demo();
    w.rank(0).status = Some(LlamaShardStatus {
        phase: Some(ShardPhase::Loading),
        ..Default::default()
    });
    w.rank(2).status = failed("PeerUnreachable", CLOSED);
    w.rank(3).status = failed("PeerUnreachable", CLOSED);
    let out = w.step(110);
    let (reason, message) = restart_message(&out);
    assert_eq!(reason, "RankFailed");
    assert_eq!(
        message,
        "rank 1 on demo-b stopped answering; ranks 2–3 lost their peer"
    );
    let (_, ready_reason, ready) = w.condition(READY);
    assert_eq!(ready_reason, "Recovering");
    assert_eq!(
        ready,
        "rank 1 on demo-b stopped answering; ranks 2–3 lost their peer; \
         re-forming, restart 1 of 5"
    );
    let record = w.status.last_restart.clone().expect("record");
    assert_eq!(
        (record.reason.as_str(), record.message.as_str()),
        ("RankFailed", message.as_str())
    );
    let note = &out.notices[0];
    assert_eq!(note.reason, "Restarting");
    assert!(
        note.note.starts_with(
            "rank 1 on demo-b stopped answering; ranks 2–3 lost their peer; \
             re-forming, restart 1 of 5 (epoch 2: rank 0 on demo-a; "
        ),
        "{}",
        note.note
    );

    // While the new group forms, the message keeps the cause and says how far it is.
    let out = w.step(111);
    assert!(out.new_epoch.is_none());
    let (_, ready_reason, ready) = w.condition(READY);
    assert_eq!(ready_reason, "Recovering");
    assert!(
        ready.starts_with("rank 1 on demo-b stopped answering"),
        "{ready}"
    );
    assert!(ready.contains("ranks 2–3 lost their peer"), "{ready}");
    assert!(ready.contains("restart 1 of 5"), "{ready}");
    assert!(ready.ends_with("; 0 of 4 ranks loaded"), "{ready}");
    assert!(!note.note.contains("restarting in"), "{}", note.note);
    for text in [&ready, &record.message] {
        assert!(!text.contains("restarting in"), "{text}");
        assert_eq!(text.matches("demo-b").count(), 1, "said once: {text}");
    }
}

#[test]
fn a_rank_that_names_the_peer_it_lost_points_at_the_cause() {
    // Rank 0 saw rank 1's job stream close; ranks 2 and 3 lost rank 0's.
    let mut w = serving_on_demo();
    w.rank(0).status = failed(
        "PeerUnreachable",
        "rank 1 left the group (its job stream closed); restarting in 1s (restart 1)",
    );
    w.rank(2).status = failed("PeerUnreachable", CLOSED);
    w.rank(3).status = failed("PeerUnreachable", CLOSED);
    let (reason, message) = restart_message(&w.step(110));
    assert_eq!(reason, "RankFailed");
    assert_eq!(
        message,
        "rank 1 on demo-b stopped answering; ranks 0, 2–3 lost their peer"
    );
}

#[test]
fn a_lost_node_is_the_cause_of_its_peers_losing_the_group() {
    let mut w = serving_on_demo();
    w.nodes.push(ninfo("demo-e", 5, 64));
    w.node("demo-b").ready = false;
    w.rank(0).status = failed(
        "PeerUnreachable",
        "rank 1 left the group (its job stream closed); restarting in 2s (restart 2)",
    );
    w.rank(2).status = failed("PeerUnreachable", CLOSED);
    w.rank(3).status = failed("PeerUnreachable", CLOSED);
    let out = w.step(110);
    let (reason, message) = restart_message(&out);
    assert_eq!(reason, "NodeLost");
    assert_eq!(
        message,
        "rank 1 on demo-b: node lost (Lease expired or agent not Ready); \
         ranks 0, 2–3 lost their peer"
    );
    assert_eq!(
        w.status.last_restart.as_ref().map(|r| r.reason.as_str()),
        Some("NodeLost")
    );
    assert!(
        out.notices[0].note.contains("demo-b"),
        "{}",
        out.notices[0].note
    );
    let (_, _, ready) = w.condition(READY);
    assert!(ready.ends_with("; re-forming, restart 1 of 5"), "{ready}");
    assert_eq!(w.placement()[1], (1, "demo-e".to_owned()), "rank 1 moves");
}

#[test]
fn a_rank_that_failed_by_itself_is_the_cause() {
    let mut w = serving_on_demo();
    w.rank(2).status = failed(
        "WorkerCrashed",
        "the worker was killed by signal 9; restarting in 1s (restart 1)",
    );
    w.rank(0).status = failed(
        "PeerUnreachable",
        "rank 2 left the group (its job stream closed); restarting in 1s (restart 1)",
    );
    w.rank(1).status = failed("PeerUnreachable", CLOSED);
    w.rank(3).status = failed("PeerUnreachable", CLOSED);
    let out = w.step(110);
    let (reason, message) = restart_message(&out);
    assert_eq!(reason, "RankFailed");
    assert_eq!(
        message,
        "rank 2 on demo-c failed: WorkerCrashed: the worker was killed by signal 9; \
         ranks 0–1, 3 lost their peer"
    );

    // It fails again at once: the condition says the cause and the backoff.
    w.rank(2).status = failed("OutOfMemory", "cannot allocate 3 GiB");
    w.step(111);
    let (_, reason, ready) = w.condition(READY);
    assert_eq!(reason, "RankFailed");
    assert!(
        ready.starts_with(
            "rank 2 on demo-c failed: OutOfMemory: cannot allocate 3 GiB; backing off, \
             re-forming at "
        ),
        "{ready}"
    );
    assert!(ready.ends_with(", restart 2 of 5"), "{ready}");
}

#[test]
fn when_every_rank_lost_the_group_the_one_its_peers_name_says_why() {
    let mut w = serving_on_demo();
    w.rank(0).status = failed(
        "PeerUnreachable",
        "cannot listen on control port 47001: address in use; restarting in 1s (restart 1)",
    );
    for rank in 1..4 {
        w.rank(rank).status = failed(
            "PeerUnreachable",
            "rank 0's control service at 10.0.0.1:47001 was unreachable for 120s: \
             connection refused",
        );
    }
    let (_, message) = restart_message(&w.step(110));
    assert_eq!(
        message,
        "rank 0 on demo-a failed: PeerUnreachable: cannot listen on control port 47001: \
         address in use; ranks 1–3 lost their peer"
    );
}

#[test]
fn peer_loss_messages_name_the_peer_that_went_away() {
    assert_eq!(
        mentions("the group broke: rank 3 left the group (its job stream closed)"),
        [Mention::Gone(3, STOPPED)]
    );
    assert_eq!(
        mentions(
            "rank 0 refused rank 2: ranks [1, 3] did not reach the connect barrier within 120s"
        ),
        [
            Mention::Alive(0),
            Mention::Gone(1, LATE),
            Mention::Gone(3, LATE)
        ]
    );
    assert_eq!(
        mentions("lost rank 0's job stream: transport error"),
        [Mention::Gone(0, STOPPED)]
    );
    assert_eq!(mentions(CLOSED), [Mention::Alive(0)]);
    assert!(mentions("forming the MLX ring group failed: timeout").is_empty());
    assert_eq!(
        without_retry_note("lost: a; b; restarting in 30s (restart 7)"),
        "lost: a; b"
    );
    assert_eq!(
        without_retry_note("restarting in style"),
        "restarting in style"
    );
    assert_eq!(rank_list(&[2]), "rank 2");
    assert_eq!(rank_list(&[3, 2]), "ranks 2–3");
    assert_eq!(rank_list(&[0, 2, 3]), "ranks 0, 2–3");
    assert_eq!(rank_list(&[0, 1, 2, 5, 7]), "ranks 0–2, 5, 7");
    assert_eq!(clip("abcdef", 3), "abc…");
    assert_eq!(clip("abc", 3), "abc");
}

#[test]
fn a_silent_rank_0_is_the_suspect_when_no_other_rank_is_left() {
    // Rank 0's agent is killed and its followers saw the stream end cleanly.
    let mut w = serving_on_demo();
    for rank in 1..4 {
        w.rank(rank).status = failed("PeerUnreachable", CLOSED);
    }
    let (_, message) = restart_message(&w.step(110));
    assert_eq!(
        message,
        "rank 0 on demo-a stopped answering; ranks 1–3 lost their peer"
    );
}

fn downloading(done: i64) -> Option<LlamaShardStatus> {
    Some(LlamaShardStatus {
        phase: Some(ShardPhase::Downloading),
        progress: Some(tandem_crds::Progress {
            bytes_done: done,
            bytes_total: Some(1000),
        }),
        ..Default::default()
    })
}

fn progress_time(w: &World) -> Option<Timestamp> {
    w.status.last_progress_time.as_ref().map(|t| t.0)
}

#[test]
fn a_group_that_stops_making_progress_times_out_and_is_restarted() {
    let mut w = World::new(2, nodes(2));
    w.step(100);
    assert_eq!(progress_time(&w), Some(ts(100)), "placing is progress");

    // A download that advances is progress, however long it takes.
    w.rank(0).status = downloading(100);
    w.step(500);
    assert_eq!(progress_time(&w), Some(ts(500)));
    assert_eq!(w.status.ranks[0].bytes_done, Some(100));
    w.rank(0).status = downloading(200);
    w.step(1000);
    assert_eq!(progress_time(&w), Some(ts(1000)));
    // Nothing moves: the clock keeps running, and the operator looks again
    // when the limit is reached.
    let out = w.step(1500);
    assert_eq!(progress_time(&w), Some(ts(1000)));
    assert_eq!(out.requeue_after, Duration::from_secs(100));
    assert!(out.new_epoch.is_none());
    assert_eq!(w.status.phase, Some(DeploymentPhase::Loading));

    let out = w.step(1600);
    let Some(EpochCause::Restart { reason, message }) = &out.new_epoch else {
        panic!("a restart: {:?}", out.new_epoch);
    };
    assert_eq!(*reason, "LoadTimeout");
    assert!(
        message.starts_with(
            "no progress for 600s (the limit is 600s) while waiting for every rank to load \
             its weights (0 of 2 loaded): rank 0 on n1: Downloading 20%; rank 1 on n2: Pending"
        ),
        "{message}"
    );
    assert_eq!(reasons(&out), ["LoadTimeout", "Restarting", "Degraded"]);
    assert_eq!(w.status.epoch, 2);
    assert_eq!(w.status.restart_count, 1);
    assert_eq!(
        w.status.last_restart.as_ref().map(|r| r.reason.as_str()),
        Some("LoadTimeout")
    );
    let (ok, why, text) = w.condition(READY);
    assert_eq!((ok.as_str(), why.as_str()), ("False", "LoadTimeout"));
    assert!(text.contains("re-forming, restart 1 of 3"), "{text}");
    assert_eq!(
        progress_time(&w),
        Some(ts(1600)),
        "the new epoch starts the clock"
    );
    // While the new group loads, Ready keeps saying why it was restarted.
    w.all(ShardPhase::Connecting);
    w.step(1601);
    assert_eq!(w.condition(READY).1, "LoadTimeout");
    assert_eq!(w.status.phase, Some(DeploymentPhase::Degraded));

    // Serving ends the watch.
    w.all(ShardPhase::Ready);
    w.step(1602);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Serving));
    assert_eq!(progress_time(&w), None);
    let out = w.step(5000);
    assert!(out.new_epoch.is_none(), "a serving group never times out");
}

#[test]
fn a_loaded_group_that_never_turns_ready_is_a_formation_timeout_and_spends_the_budget() {
    let mut w = World::new(2, nodes(2));
    w.settings.load_timeout = Duration::from_secs(60);
    w.step(100);
    w.all(ShardPhase::Loaded);
    w.step(110);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Forming));
    let out = w.step(170);
    assert!(
        matches!(&out.new_epoch, Some(EpochCause::Restart { reason, .. }) if *reason == "FormationTimeout"),
        "{:?}",
        out.new_epoch
    );
    assert!(
        w.status.last_restart.as_ref().is_some_and(|r| r
            .message
            .contains("waiting for every rank to be Ready (0 of 2 ready)")),
        "{:?}",
        w.status.last_restart
    );
    // Every later epoch hangs as well: the usual backoff, then the budget.
    let mut t = 170;
    for restart in 2..=3 {
        w.all(ShardPhase::Loaded);
        t += 1;
        w.step(t);
        // 60 s still, then the backoff (10 s, 20 s) counted from the last restart.
        t += 60;
        let out = w.step(t);
        if out.new_epoch.is_none() {
            assert_eq!(w.condition(PLACED).1, "FormationTimeout");
            t += 30;
            w.step(t);
        }
        assert_eq!(w.status.restart_count, restart, "at {t}");
    }
    w.all(ShardPhase::Loaded);
    t += 1;
    w.step(t);
    t += 60;
    w.step(t);
    assert_eq!(w.status.phase, Some(DeploymentPhase::Failed));
    let (_, why, text) = w.condition(READY);
    assert_eq!(why, "RestartBudgetExhausted");
    assert!(text.contains("no progress for 60s"), "{text}");
}

#[test]
fn a_taken_secret_name_fails_the_deployment_and_keeps_the_epoch() {
    let d = deployment("llama", MODEL_1B, 2);
    let prior = LlamaDeploymentStatus {
        epoch: 3,
        ..LlamaDeploymentStatus::default()
    };
    let (status, notices) = secret_conflict(&d, &prior, "ns/llama-group-token", ts(1000));
    assert_eq!(status.epoch, 3, "no epoch was written");
    assert_eq!(status.phase, Some(DeploymentPhase::Failed));
    for type_ in [PLACED, READY] {
        let c = crate::conditions::find(&status.conditions, type_).expect("condition");
        assert_eq!(c.status, "False");
        assert_eq!(c.reason, SECRET_CONFLICT);
        assert!(
            c.message.starts_with(
                "Secret ns/llama-group-token already exists and was not created by this deployment"
            ),
            "{}",
            c.message
        );
    }
    assert!(
        notices
            .iter()
            .any(|n| n.reason == SECRET_CONFLICT && n.severity == Severity::Warning),
        "{notices:?}"
    );
}

/// Each rank's node and ring port in the current epoch.
fn ring_ports(w: &World) -> Vec<(i32, String, String)> {
    let mut v: Vec<(i32, String, String)> = w
        .shards
        .iter()
        .filter(|s| s.spec.epoch == w.status.epoch)
        .map(|s| {
            let address = &s.spec.peers[s.spec.rank as usize].address;
            let port = address.rsplit_once(':').expect("ip:port").1.to_owned();
            (s.spec.rank, s.spec.node_name.clone(), port)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_port_another_process_holds_is_left_out_of_the_next_placement() {
    let mut w = serving_on_demo();
    let before = ring_ports(&w);
    w.rank(1).status = failed(
        "WorkerCrashed",
        "[ring] Couldn't bind socket (error: 98); restarting in 1s (restart 1)",
    );
    w.rank(0).status = failed("PeerUnreachable", CLOSED);
    w.rank(2).status = failed("PeerUnreachable", CLOSED);
    w.rank(3).status = failed("PeerUnreachable", CLOSED);
    let out = w.step(110);
    assert!(out.new_epoch.is_some(), "the group is re-formed");
    let after = ring_ports(&w);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((b.0, &b.1), (a.0, &a.1), "every rank stays on its node");
        if b.0 == 1 {
            assert_ne!(b.2, a.2, "rank 1 moves off the port it could not bind");
        } else {
            assert_eq!(b.2, a.2, "the other ranks keep their ports");
        }
    }
}

#[test]
fn a_control_port_in_use_moves_only_that_port() {
    let mut w = serving_on_demo();
    let control_before = w.rank(0).spec.control_address.clone();
    let port = control_before
        .rsplit_once(':')
        .expect("ip:port")
        .1
        .to_owned();
    w.rank(0).status = failed(
        "PeerUnreachable",
        &format!("cannot listen on control port {port}: address in use; restarting in 1s"),
    );
    for rank in 1..4 {
        w.rank(rank).status = failed("PeerUnreachable", CLOSED);
    }
    let before = ring_ports(&w);
    w.step(110);
    assert_ne!(w.rank(0).spec.control_address, control_before);
    assert_eq!(ring_ports(&w), before, "ring ports stay");
}
