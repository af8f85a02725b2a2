use super::*;
use crate::catalog::lookup_model;
use crate::selector::{SelectorOperator, SelectorRequirement};

const GIB: u64 = 1 << 30;
const CHIP: &str = "tandem.dev/chip";

fn shape(id: &str) -> ModelShape {
    lookup_model(id).expect("bundled").shape
}

fn node(name: &str, free_gib: u64) -> NodeInfo {
    NodeInfo {
        name: name.to_owned(),
        address: format!("10.0.0.{}", name.len()),
        labels: [(CHIP.to_owned(), "apple-m3-ultra".to_owned())].into(),
        ready: true,
        unschedulable: false,
        capacity_bytes: free_gib * GIB,
        allocated_bytes: 0,
        port_range: PortRange {
            first: 40000,
            last: 40099,
        },
        used_ports: BTreeSet::new(),
    }
}

fn m3_selector() -> LabelSelector {
    LabelSelector {
        match_labels: [(CHIP.to_owned(), "apple-m3-ultra".to_owned())].into(),
        match_expressions: vec![],
    }
}

/// Llama 3.3 70B 4-bit with an 8k context: 10.7 GiB per rank at 4 ranks.
fn input(world_size: u32, nodes: Vec<NodeInfo>) -> PlanInput {
    PlanInput {
        deployment: DeploymentRequest {
            namespace: "default".into(),
            name: "llama".into(),
            world_size,
            strategy: ShardingStrategy::Tensor,
            selector: m3_selector(),
            budget: ServingBudget {
                kv_tokens: 8192,
                cache_bytes: 0,
            },
            serving_port: 8080,
        },
        shape: shape("mlx-community/Llama-3.3-70B-Instruct-4bit"),
        nodes,
        current: vec![],
    }
}

fn nodes_of(plan: &Plan) -> Vec<&str> {
    plan.ranks.iter().map(|r| r.node.as_str()).collect()
}

#[test]
fn places_one_rank_per_node_most_free_memory_first() {
    let nodes = vec![
        node("mac-a", 32),
        node("mac-b", 64),
        node("mac-c", 32),
        node("mac-d", 48),
        node("mac-e", 16),
    ];
    let plan = plan_placement(&input(4, nodes)).expect("fits");
    // 64, 48, then the two 32 GiB nodes by name.
    assert_eq!(nodes_of(&plan), ["mac-b", "mac-d", "mac-a", "mac-c"]);
    assert_eq!(plan.memory_per_rank_bytes, 11_481_661_440);
    assert_eq!(plan.ranks[0].ring_port, 40000);
    assert_eq!(plan.ranks[0].control_port, Some(40001));
    assert_eq!(plan.ranks[0].ring_endpoint(), "10.0.0.5:40000");
    assert_eq!(
        plan.ranks[0].control_endpoint().as_deref(),
        Some("10.0.0.5:40001")
    );
    assert!(plan.ranks[1..].iter().all(|r| r.ring_port == 40000));
    assert!(plan.ranks[1..].iter().all(|r| r.control_port.is_none()));
}

#[test]
fn too_few_matching_nodes_suggests_a_world_size() {
    let mut other = node("pc-1", 64);
    other.labels.insert(CHIP.into(), "intel".into());
    let nodes = vec![
        node("mac-1", 64),
        node("mac-2", 64),
        node("mac-3", 64),
        other,
    ];
    let err = plan_placement(&input(4, nodes)).expect_err("3 nodes for 4 ranks");
    assert_eq!(err.reason(), "NoMatchingNodes");
    assert_eq!(
        err.message(),
        "3 nodes match selector tandem.dev/chip=apple-m3-ultra but 4 ranks were \
         requested; scale to 2 or label more nodes"
    );
}

#[test]
fn not_ready_and_cordoned_nodes_are_counted_out() {
    let mut lost = node("mac-3", 64);
    lost.ready = false;
    let mut cordoned = node("mac-4", 64);
    cordoned.unschedulable = true;
    let nodes = vec![node("mac-1", 64), node("mac-2", 64), lost, cordoned];
    let err = plan_placement(&input(4, nodes)).expect_err("2 usable");
    assert_eq!(
        err.message(),
        "4 nodes match selector tandem.dev/chip=apple-m3-ultra, of which 2 are ready and \
         schedulable (1 not ready, 1 cordoned), but 4 ranks were requested; scale to 2, \
         uncordon or repair nodes, or label more nodes"
    );
}

#[test]
fn no_nodes_at_all() {
    let mut i = input(1, vec![]);
    let err = plan_placement(&i).expect_err("no nodes");
    assert_eq!(
        err.message(),
        "no LlamaNodes match selector tandem.dev/chip=apple-m3-ultra but 1 rank was \
         requested; label more nodes"
    );
    i.deployment.selector = LabelSelector::default();
    let err = plan_placement(&i).expect_err("no nodes");
    assert_eq!(err.reason(), "NoMatchingNodes");
    assert!(err.message().starts_with("no LlamaNodes are registered"));
}

#[test]
fn short_memory_names_the_nodes_and_what_would_fit() {
    let mut busy = node("mac-2", 24);
    busy.allocated_bytes = 16 * GIB; // 8 GiB left
    let nodes = vec![
        node("mac-1", 64),
        busy,
        node("mac-3", 64),
        node("mac-4", 64),
    ];
    let err = plan_placement(&input(4, nodes)).expect_err("mac-2 is short");
    assert_eq!(err.reason(), "InsufficientMemory");
    assert_eq!(
        err.message(),
        "4 ranks were requested and each rank needs 10.7 GiB (weights and a 8192-token KV \
         cache), but only 3 of the 4 eligible nodes have that much free (node mac-2 has \
         8.0 GiB free); world sizes that would fit: 1 (39.5 GiB per rank), 2 (20.3 GiB \
         per rank); or free memory on these nodes, add nodes, or lower \
         spec.serving.maxBatchTokens (at least spec.maxContextTokens) or \
         spec.serving.prefixCacheBytes"
    );
    let PlanError::InsufficientMemory { bytes_per_rank, .. } = err else {
        panic!("wrong variant");
    };
    assert_eq!(bytes_per_rank, 11_481_661_440);
}

#[test]
fn the_batch_budget_and_the_prefix_cache_count_against_memory() {
    // 10.7 GiB per rank for one 8k request; a 32k batch adds 1.9 GiB and
    // a 512 MiB prefix cache 0.5 GiB: 13.1 GiB, more than 12 GiB nodes have.
    let nodes: Vec<NodeInfo> = (1..=4).map(|i| node(&format!("mac-{i}"), 12)).collect();
    assert!(plan_placement(&input(4, nodes.clone())).is_ok());
    let mut batched = input(4, nodes);
    batched.deployment.budget = ServingBudget::batched(8192, 32768, 512 << 20);
    let err = plan_placement(&batched).expect_err("the batch does not fit");
    assert_eq!(err.reason(), "InsufficientMemory");
    assert!(
        err.message().starts_with(
            "4 ranks were requested and each rank needs 13.1 GiB (weights, a \
             32768-token KV cache for the batch and a 0.5 GiB prefix cache), but only 0 \
             of the 4 eligible nodes"
        ),
        "{}",
        err.message()
    );
    let PlanError::InsufficientMemory { bytes_per_rank, .. } = err else {
        panic!("wrong variant");
    };
    assert_eq!(
        bytes_per_rank,
        memory_per_rank(&batched.shape, 4, batched.deployment.budget).total()
    );
}

#[test]
fn invalid_world_size_lists_the_valid_ones() {
    let nodes = (1..=4).map(|i| node(&format!("mac-{i}"), 64)).collect();
    let err = plan_placement(&input(3, nodes)).expect_err("3 does not divide");
    assert_eq!(err.reason(), "InvalidSharding");
    assert_eq!(
        err.message(),
        "world size 3 does not split the model evenly: 64 attention heads do not divide \
         by 3; valid world sizes: 1, 2, 4, 8"
    );
    let mut zero = input(0, vec![]);
    assert_eq!(
        plan_placement(&zero).map_err(|e| e.reason()),
        Err("InvalidSharding")
    );
    zero.deployment.world_size = 2;
    zero.deployment.strategy = ShardingStrategy::Pipeline;
    let err = plan_placement(&zero).expect_err("pipeline");
    assert!(err.message().contains("Pipeline is reserved"), "{err}");
    zero.deployment.strategy = ShardingStrategy::Tensor;
    zero.shape.num_key_value_heads = 0;
    let err = plan_placement(&zero).expect_err("bad shape");
    assert_eq!(err.reason(), "InvalidSharding");
    assert!(
        err.message()
            .contains("num_key_value_heads must be positive"),
        "{err}"
    );
}

#[test]
fn valid_current_placement_stays_even_if_a_better_node_appears() {
    let mut i = input(2, vec![node("mac-1", 32), node("mac-2", 32)]);
    let first = plan_placement(&i).expect("fits");
    i.current = first.as_current();
    i.nodes.push(node("mac-0", 128));
    let second = plan_placement(&i).expect("fits");
    assert_eq!(second, first);
    assert!(second.same_placement_as(&i.current));
}

#[test]
fn cordon_keeps_ranks_but_takes_no_new_ones() {
    let mut i = input(
        2,
        vec![node("mac-1", 64), node("mac-2", 32), node("mac-3", 16)],
    );
    let first = plan_placement(&i).expect("fits");
    assert_eq!(nodes_of(&first), ["mac-1", "mac-2"]);
    i.current = first.as_current();
    for n in &mut i.nodes {
        n.unschedulable = n.name != "mac-3";
    }
    assert_eq!(plan_placement(&i).expect("kept"), first);
    // Growing to 4 needs two new nodes; only mac-3 is schedulable.
    i.deployment.world_size = 4;
    i.nodes.push(node("mac-4", 16));
    let grown = plan_placement(&i).expect("grows");
    assert_eq!(nodes_of(&grown), ["mac-1", "mac-2", "mac-3", "mac-4"]);
    // A fresh plan could not use the cordoned nodes.
    i.current.clear();
    assert_eq!(
        plan_placement(&i).map_err(|e| e.reason()),
        Err("NoMatchingNodes")
    );
}

#[test]
fn a_lost_node_loses_its_rank() {
    let mut i = input(
        2,
        vec![node("mac-1", 64), node("mac-2", 48), node("mac-3", 32)],
    );
    let first = plan_placement(&i).expect("fits");
    i.current = first.as_current();
    i.nodes[0].ready = false;
    let second = plan_placement(&i).expect("re-placed");
    // Rank 1 stays; rank 0 moves to the only free node.
    assert_eq!(nodes_of(&second), ["mac-3", "mac-2"]);
    assert_eq!(second.ranks[1], first.ranks[1]);
    assert!(!second.same_placement_as(&i.current));
}

#[test]
fn a_node_that_no_longer_matches_loses_its_rank() {
    let mut i = input(1, vec![node("mac-1", 64), node("mac-2", 48)]);
    i.current = plan_placement(&i).expect("fits").as_current();
    i.nodes[0].labels.clear();
    assert_eq!(nodes_of(&plan_placement(&i).expect("moves")), ["mac-2"]);
}

#[test]
fn growing_keeps_ranks_and_shrinking_drops_the_highest() {
    let nodes: Vec<NodeInfo> = (1..=8).map(|i| node(&format!("mac-{i}"), 64)).collect();
    let mut i = input(2, nodes);
    let two = plan_placement(&i).expect("2");
    i.current = two.as_current();
    i.deployment.world_size = 8;
    let eight = plan_placement(&i).expect("8");
    assert_eq!(eight.ranks[..2], two.ranks[..]);
    i.current = eight.as_current();
    i.deployment.world_size = 4;
    let four = plan_placement(&i).expect("4");
    assert_eq!(four.ranks[..], eight.ranks[..4]);
}

#[test]
fn ports_avoid_other_deployments_and_the_serving_port() {
    let mut a = node("mac-1", 64);
    a.port_range = PortRange {
        first: 8079,
        last: 8083,
    };
    a.used_ports = [8079, 8081].into();
    let plan = plan_placement(&input(1, vec![a])).expect("fits");
    // 8079 and 8081 are taken, 8080 is this deployment's serving port.
    assert_eq!(plan.ranks[0].ring_port, 8082);
    assert_eq!(plan.ranks[0].control_port, Some(8083));
}

#[test]
fn rank_0_goes_where_the_serving_port_is_free() {
    let mut busy = node("mac-1", 128);
    busy.used_ports.insert(8080);
    let plan = plan_placement(&input(2, vec![busy.clone(), node("mac-2", 64)])).expect("ok");
    assert_eq!(nodes_of(&plan), ["mac-2", "mac-1"]);
    let mut also_busy = node("mac-2", 64);
    also_busy.used_ports.insert(8080);
    let err = plan_placement(&input(2, vec![busy, also_busy])).expect_err("no rank 0");
    assert_eq!(err.reason(), "NoMatchingNodes");
    assert!(
        err.message()
            .contains("node mac-1 has serving port 8080 in use, so it cannot run rank 0"),
        "{err}"
    );
}

#[test]
fn a_lost_rank_0_takes_over_a_kept_rank_that_can_serve() {
    let mut i = input(
        2,
        vec![node("mac-1", 64), node("mac-2", 48), node("mac-3", 32)],
    );
    i.nodes[2].used_ports.insert(8080); // mac-3 cannot serve
    let first = plan_placement(&i).expect("fits");
    assert_eq!(nodes_of(&first), ["mac-1", "mac-2"]);
    i.current = first.as_current();
    i.nodes[0].ready = false;
    let second = plan_placement(&i).expect("re-placed");
    assert_eq!(nodes_of(&second), ["mac-2", "mac-3"]);
}

#[test]
fn exhausted_port_ranges_are_explained() {
    let mut full = node("mac-1", 64);
    full.port_range = PortRange {
        first: 40000,
        last: 40000,
    };
    full.used_ports.insert(40000);
    let err = plan_placement(&input(1, vec![full])).expect_err("no port");
    assert_eq!(
        err.message(),
        "1 rank was requested and 1 node has the memory, but not the ports ranks need \
         (node mac-1 has no free port in 40000-40000); widen the agents' port ranges, \
         change spec.serving.port, or label more nodes"
    );
}

#[test]
fn current_ports_that_clash_now_are_replaced_on_the_same_node() {
    let mut i = input(2, vec![node("mac-1", 64), node("mac-2", 32)]);
    let first = plan_placement(&i).expect("fits");
    i.current = first.as_current();
    i.nodes[1].used_ports.insert(first.ranks[1].ring_port);
    let second = plan_placement(&i).expect("fits");
    assert_eq!(second.ranks[1].node, "mac-2");
    assert_eq!(second.ranks[1].ring_port, 40001);
    assert_eq!(second.ranks[0], first.ranks[0]);
}

#[test]
fn expressions_select_nodes() {
    let mut i = input(1, vec![node("mac-1", 64), node("mac-2", 48)]);
    i.deployment.selector = LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![SelectorRequirement {
            key: "tandem.dev/pool".into(),
            operator: SelectorOperator::DoesNotExist,
            values: vec![],
        }],
    };
    i.nodes[0]
        .labels
        .insert("tandem.dev/pool".into(), "x".into());
    assert_eq!(nodes_of(&plan_placement(&i).expect("ok")), ["mac-2"]);
}

#[test]
fn port_ranges_parse_as_first_dash_last() {
    assert_eq!(
        "41000-41999".parse::<PortRange>(),
        Ok(PortRange {
            first: 41000,
            last: 41999
        })
    );
    assert_eq!(
        " 7 - 7 ".parse::<PortRange>().map(|r| r.ports().count()),
        Ok(1)
    );
    for bad in ["5-1", "x-1", "0-10", "47000", "1-70000", ""] {
        let err = bad.parse::<PortRange>().expect_err(bad);
        assert!(err.contains("FIRST-LAST"), "{err}");
    }
}
