//! What a runner checks of a shard's spec before it acts on it; the
//! message says what is wrong. The worker trusts a launch built from a
//! validated spec.

use super::*;

/// Checks what the runner needs from the spec; the message says what is wrong.
/// Returns the peers' addresses by rank, for the ring hostfile.
pub(super) fn validate(node_name: &str, shard: &LlamaShard) -> Result<Vec<String>, String> {
    let spec = &shard.spec;
    if spec.node_name != node_name {
        return Err(format!(
            "spec.nodeName is {} but this agent is {node_name}",
            spec.node_name
        ));
    }
    let world = usize::try_from(spec.world_size).unwrap_or(0);
    if world == 0 || spec.rank < 0 || spec.rank >= spec.world_size {
        return Err(format!(
            "rank {} is outside a group of {}",
            spec.rank, spec.world_size
        ));
    }
    let mut peers = spec.peers.clone();
    peers.sort_by_key(|p| p.rank);
    let ranks: Vec<i32> = peers.iter().map(|p| p.rank).collect();
    let expected: Vec<i32> = (0..spec.world_size).collect();
    if ranks != expected {
        return Err(format!(
            "spec.peers must list ranks 0..{} once each, not {ranks:?}",
            spec.world_size - 1
        ));
    }
    for p in &peers {
        if p.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "peer {} address `{}` is not ip:port",
                p.rank, p.address
            ));
        }
    }
    if spec.rank == 0 && spec.serving_port.is_none() {
        return Err("rank 0 has no spec.servingPort".into());
    }
    // Both are joined into paths under the model directories.
    if let Some(problem) = models::path_problem("spec.model", &spec.model, true).or_else(|| {
        spec.revision
            .as_deref()
            .and_then(|r| models::path_problem("spec.revision", r, false))
    }) {
        return Err(problem);
    }
    if world > 1
        && spec
            .control_address
            .parse::<std::net::SocketAddr>()
            .is_err()
    {
        return Err(format!(
            "spec.controlAddress `{}` is not ip:port",
            spec.control_address
        ));
    }
    if let Some(b) = &spec.batching
        && b.max_tokens < spec.max_context_tokens
    {
        return Err(format!(
            "spec.batching.maxTokens ({}) is less than spec.maxContextTokens ({}), so a \
             request of the longest context could never run",
            b.max_tokens, spec.max_context_tokens
        ));
    }
    Ok(peers.into_iter().map(|p| p.address).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_crds::BatchLimits;

    /// Rank `rank` of a group of three on `n1`, as the operator writes it.
    fn shard(rank: i32) -> LlamaShard {
        let spec = json!({
            "deployment": "llama", "epoch": 2, "rank": rank, "worldSize": 3, "nodeName": "n1",
            "model": "org/model", "revision": "main",
            "architecture": {
                "numHiddenLayers": 2, "hiddenSize": 64, "numAttentionHeads": 4,
                "numKeyValueHeads": 2, "intermediateSize": 128, "vocabSize": 256
            },
            "backend": "Ring",
            "peers": [
                {"rank": 2, "node": "n3", "address": "10.0.0.3:29000"},
                {"rank": 0, "node": "n1", "address": "10.0.0.1:29000"},
                {"rank": 1, "node": "n2", "address": "[fd00::2]:29000"}
            ],
            "controlAddress": "10.0.0.1:29001", "servingPort": 8080,
            "groupTokenSecretRef": {"name": "llama-group-token"},
            "maxContextTokens": 2048
        });
        LlamaShard::new("llama-e2-r0", serde_json::from_value(spec).expect("spec"))
    }

    #[test]
    fn a_valid_shard_gives_the_peers_by_rank() {
        assert_eq!(
            validate("n1", &shard(0)),
            Ok(vec![
                "10.0.0.1:29000".to_owned(),
                "[fd00::2]:29000".to_owned(),
                "10.0.0.3:29000".to_owned()
            ])
        );
    }

    #[test]
    fn each_problem_is_named() {
        type Spoil = Box<dyn Fn(&mut LlamaShard)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "spec.nodeName is n2 but this agent is n1",
                Box::new(|s| s.spec.node_name = "n2".into()),
            ),
            (
                "rank 3 is outside a group of 3",
                Box::new(|s| s.spec.rank = 3),
            ),
            (
                "rank -1 is outside a group of 3",
                Box::new(|s| s.spec.rank = -1),
            ),
            (
                "rank 0 is outside a group of 0",
                Box::new(|s| s.spec.world_size = 0),
            ),
            (
                "spec.peers must list ranks 0..2 once each, not [0, 1, 1]",
                Box::new(|s| s.spec.peers[0].rank = 1),
            ),
            (
                "peer 1 address `n2:29000` is not ip:port",
                Box::new(|s| s.spec.peers[2].address = "n2:29000".into()),
            ),
            (
                "rank 0 has no spec.servingPort",
                Box::new(|s| s.spec.serving_port = None),
            ),
            (
                "spec.controlAddress `rank0` is not ip:port",
                Box::new(|s| s.spec.control_address = "rank0".into()),
            ),
            (
                "spec.revision",
                Box::new(|s| s.spec.revision = Some("../../etc".into())),
            ),
            (
                "spec.model",
                Box::new(|s| s.spec.model = "/etc/passwd/..".into()),
            ),
            (
                "spec.batching.maxTokens (1024) is less than spec.maxContextTokens (2048)",
                Box::new(|s| {
                    s.spec.batching = Some(BatchLimits {
                        max_tokens: 1024,
                        ..BatchLimits::default()
                    })
                }),
            ),
        ];
        for (expected, spoil) in cases {
            let mut s = shard(0);
            spoil(&mut s);
            let err = validate("n1", &s).expect_err(expected);
            assert!(err.starts_with(expected), "{err} (expected {expected})");
        }
    }

    #[test]
    fn a_group_of_one_needs_no_control_address() {
        let mut s = shard(0);
        s.spec.world_size = 1;
        s.spec.peers.retain(|p| p.rank == 0);
        s.spec.control_address = String::new();
        assert_eq!(validate("n1", &s), Ok(vec!["10.0.0.1:29000".to_owned()]));
    }
}
