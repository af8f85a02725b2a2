//! From a deployment's spec to the planner's plain inputs: a
//! [`DeploymentRequest`], a [`ModelShape`] (and back, the architecture every
//! shard carries), the label selector, the batch limits and serving budget,
//! and a deployment's own shards to [`CurrentRank`]s. What the operator
//! observes of nodes, Leases and other deployments is in
//! [`observe`](crate::observe). Pure: no I/O, no clock.

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use kube::ResourceExt;
use tandem_crds::{
    Architecture, BatchLimits, LlamaDeployment, LlamaShard, ShardingStrategy as CrdStrategy,
    default_serving_port,
};
use tandem_planner::{
    CurrentRank, DeploymentRequest, LabelSelector, ModelShape, SelectorOperator,
    SelectorRequirement, ServingBudget, ShardingStrategy, resolve_model,
};

use crate::decide::Blocker;

/// The deployment's model shape: `spec.architecture`, else the catalog.
pub fn resolve_shape(d: &LlamaDeployment) -> Result<ModelShape, Blocker> {
    let from_spec = d.spec.architecture.as_ref().map(Architecture::shape);
    resolve_model(&d.spec.model, from_spec.as_ref()).map_err(Blocker::Plan)
}

/// A `metav1.LabelSelector` in the planner's form. Operators other than the
/// four Kubernetes defines are refused rather than guessed at.
pub fn selector(sel: Option<&metav1::LabelSelector>) -> Result<LabelSelector, Blocker> {
    let Some(sel) = sel else {
        return Ok(LabelSelector::default());
    };
    let mut out = LabelSelector {
        match_labels: sel.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for req in sel.match_expressions.iter().flatten() {
        let operator = match req.operator.as_str() {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => {
                return Err(Blocker::InvalidSelector(format!(
                    "spec.placement.nodeSelector: unknown operator {other:?} for key {:?}; \
                     use In, NotIn, Exists or DoesNotExist",
                    req.key
                )));
            }
        };
        out.match_expressions.push(SelectorRequirement {
            key: req.key.clone(),
            operator,
            values: req.values.clone().unwrap_or_default(),
        });
    }
    Ok(out)
}

/// `spec.serving.port`, defaulted, as a port number (0 when out of range,
/// which the schema already prevents).
pub fn serving_port(d: &LlamaDeployment) -> u16 {
    let port = d
        .spec
        .serving
        .as_ref()
        .map_or_else(default_serving_port, |s| s.port);
    u16::try_from(port).unwrap_or(0)
}

/// The batch limits the deployment's shards get
/// ([`LlamaDeploymentSpec::batch_limits`](tandem_crds::LlamaDeploymentSpec::batch_limits)),
/// checked. The schema bounds each field on its own (an API server with an
/// older CRD may not, so the bounds are checked again); what it cannot check
/// is that the batch's token budget holds one request of the longest
/// context. Each refusal says what would work.
pub fn batch_limits(d: &LlamaDeployment) -> Result<BatchLimits, Blocker> {
    let limits = d.spec.batch_limits();
    let invalid = |m: String| Err(Blocker::InvalidServing(m));
    if !(1..=256).contains(&limits.max_sequences) {
        return invalid(format!(
            "spec.serving.maxBatchSequences is {}; use 1 to 256 (the default is {})",
            limits.max_sequences,
            BatchLimits::DEFAULT_MAX_SEQUENCES
        ));
    }
    if limits.prefill_chunk_tokens < 16 {
        return invalid(format!(
            "spec.serving.prefillChunkTokens is {}; use at least 16 (the default is {})",
            limits.prefill_chunk_tokens,
            BatchLimits::DEFAULT_PREFILL_CHUNK_TOKENS
        ));
    }
    if limits.prefix_cache_bytes < 0 {
        return invalid(format!(
            "spec.serving.prefixCacheBytes is {}; use 0 (no prefix cache) or more bytes \
             (the default is {})",
            limits.prefix_cache_bytes,
            BatchLimits::DEFAULT_PREFIX_CACHE_BYTES
        ));
    }
    let context = d.spec.max_context_tokens;
    if limits.max_tokens < context {
        return invalid(format!(
            "spec.serving.maxBatchTokens ({}) is less than spec.maxContextTokens ({context}), \
             so a request of the longest context could never be admitted; set maxBatchTokens \
             to at least {context} (or leave it out: the default is {} or maxContextTokens, \
             whichever is larger), or lower maxContextTokens to at most {}",
            limits.max_tokens,
            BatchLimits::DEFAULT_MAX_TOKENS,
            limits.max_tokens
        ));
    }
    Ok(limits)
}

/// What each rank keeps for serving under `limits` with requests of up to
/// `max_context_tokens`: a KV cache for the batch's token budget (never less
/// than one longest request) and the prefix cache.
pub fn serving_budget(limits: &BatchLimits, max_context_tokens: u32) -> ServingBudget {
    ServingBudget::batched(
        u64::from(max_context_tokens),
        u64::from(limits.max_tokens),
        u64::try_from(limits.prefix_cache_bytes).unwrap_or(0),
    )
}

/// What the deployment asks the planner for.
pub fn deployment_request(d: &LlamaDeployment) -> Result<DeploymentRequest, Blocker> {
    let limits = batch_limits(d)?;
    let node_selector = d
        .spec
        .placement
        .as_ref()
        .and_then(|p| p.node_selector.as_ref());
    Ok(DeploymentRequest {
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        world_size: u32::try_from(d.spec.sharding.world_size).unwrap_or(0),
        strategy: match d.spec.sharding.strategy {
            CrdStrategy::Tensor => ShardingStrategy::Tensor,
            CrdStrategy::Pipeline => ShardingStrategy::Pipeline,
        },
        selector: selector(node_selector)?,
        budget: serving_budget(&limits, d.spec.max_context_tokens),
        serving_port: serving_port(d),
    })
}

/// The port of an `ip:port` or `[ipv6]:port` endpoint.
pub fn endpoint_port(endpoint: &str) -> Option<u16> {
    endpoint.rsplit_once(':')?.1.parse().ok()
}

/// The host of an `ip:port` or `[ipv6]:port` endpoint, brackets kept.
pub fn endpoint_host(endpoint: &str) -> Option<&str> {
    Some(endpoint.rsplit_once(':')?.0).filter(|h| !h.is_empty())
}

/// A deployment's shards of one epoch as the planner's current placement.
pub fn current_ranks(shards: &[&LlamaShard]) -> Vec<CurrentRank> {
    shards
        .iter()
        .filter_map(|shard| {
            let s = &shard.spec;
            let ring = s
                .peers
                .iter()
                .find(|p| p.rank == s.rank)
                .and_then(|p| endpoint_port(&p.address))?;
            Some(CurrentRank {
                rank: u32::try_from(s.rank).ok()?,
                node: s.node_name.clone(),
                ring_port: ring,
                control_port: if s.rank == 0 {
                    endpoint_port(&s.control_address)
                } else {
                    None
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use tandem_crds::Placement;
    use tandem_planner::lookup_model;

    #[test]
    fn endpoints_parse() {
        assert_eq!(endpoint_port("10.0.0.1:47000"), Some(47000));
        assert_eq!(endpoint_port("[fd00::1]:47000"), Some(47000));
        assert_eq!(endpoint_host("[fd00::1]:47000"), Some("[fd00::1]"));
        assert_eq!(endpoint_host("10.0.0.1:1"), Some("10.0.0.1"));
        assert_eq!(endpoint_port("nonsense"), None);
    }

    #[test]
    fn shape_comes_from_the_spec_or_the_catalog() {
        let d = deployment("a", MODEL_1B, 2);
        assert_eq!(
            resolve_shape(&d),
            Ok(lookup_model(MODEL_1B).expect("1b").shape)
        );
        let mut unknown = deployment("b", "me/tiny", 2);
        let err = resolve_shape(&unknown).expect_err("unknown");
        assert_eq!(err.reason(), "UnknownModel");
        assert!(err.is_spec_error());
        let tiny = Architecture {
            num_hidden_layers: 2,
            hidden_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            vocab_size: 256,
            head_dim: None,
            tie_word_embeddings: true,
            quantization: None,
            dtype: tandem_crds::WeightDtype::Float32,
        };
        unknown.spec.architecture = Some(tiny.clone());
        assert_eq!(resolve_shape(&unknown), Ok(tiny.shape()));
    }

    #[test]
    fn selectors_convert_and_unknown_operators_are_refused() {
        let sel = metav1::LabelSelector {
            match_labels: Some([("tandem.dev/chip".to_owned(), "m3".to_owned())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "In".into(),
                values: Some(vec!["a".into()]),
            }]),
        };
        let s = selector(Some(&sel)).expect("valid");
        assert_eq!(s.to_string(), "tandem.dev/chip=m3,zone in (a)");
        let mut bad = sel.clone();
        if let Some(exprs) = bad.match_expressions.as_mut() {
            exprs[0].operator = "Near".into();
        }
        let err = selector(Some(&bad)).expect_err("bad operator");
        assert_eq!(err.reason(), "InvalidSelector");
        assert!(err.message().contains("Near"), "{}", err.message());
        assert!(selector(None).expect("none").is_empty());
    }

    #[test]
    fn request_carries_the_spec() {
        let mut d = deployment("a", MODEL_1B, 4);
        d.spec.placement = Some(Placement {
            node_selector: Some(metav1::LabelSelector {
                match_labels: Some([("k".to_owned(), "v".to_owned())].into()),
                match_expressions: None,
            }),
        });
        let r = deployment_request(&d).expect("request");
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("ns", "a"));
        assert_eq!(r.world_size, 4);
        assert_eq!(r.serving_port, 8080);
        assert_eq!(
            r.budget,
            ServingBudget {
                kv_tokens: 32768,
                cache_bytes: 512 << 20
            }
        );
        assert_eq!(r.selector.to_string(), "k=v");
        d.spec.sharding.world_size = -1;
        assert_eq!(deployment_request(&d).expect("request").world_size, 0);
    }

    #[test]
    fn batch_limits_default_to_the_context_and_refuse_nonsense() {
        let mut d = deployment("a", MODEL_1B, 2);
        assert_eq!(batch_limits(&d), Ok(BatchLimits::default()));
        // A long context raises the default token budget with it.
        d.spec.max_context_tokens = 65536;
        assert_eq!(batch_limits(&d).map(|l| l.max_tokens), Ok(65536));
        assert_eq!(
            deployment_request(&d).map(|r| r.budget.kv_tokens),
            Ok(65536)
        );

        // A budget set below the context cannot admit the longest request.
        d.spec.serving = Some(tandem_crds::Serving {
            max_batch_tokens: Some(16384),
            ..Default::default()
        });
        let err = batch_limits(&d).expect_err("16384 < 65536");
        assert_eq!(err.reason(), "InvalidServing");
        assert!(err.is_spec_error());
        assert_eq!(
            err.message(),
            "spec.serving.maxBatchTokens (16384) is less than spec.maxContextTokens (65536), \
             so a request of the longest context could never be admitted; set maxBatchTokens \
             to at least 65536 (or leave it out: the default is 32768 or maxContextTokens, \
             whichever is larger), or lower maxContextTokens to at most 16384"
        );
        assert_eq!(deployment_request(&d).map(|_| ()), Err(err));
        d.spec.max_context_tokens = 16384;
        assert_eq!(batch_limits(&d).map(|l| l.max_tokens), Ok(16384));

        // What the schema refuses, in case the installed CRD is older.
        let bad = |serving: tandem_crds::Serving| {
            let mut d = deployment("b", MODEL_1B, 2);
            d.spec.serving = Some(serving);
            batch_limits(&d).expect_err("refused").message()
        };
        let m = bad(tandem_crds::Serving {
            max_batch_sequences: Some(0),
            ..Default::default()
        });
        assert!(m.contains("maxBatchSequences is 0; use 1 to 256"), "{m}");
        let m = bad(tandem_crds::Serving {
            prefill_chunk_tokens: Some(8),
            ..Default::default()
        });
        assert!(
            m.contains("prefillChunkTokens is 8; use at least 16"),
            "{m}"
        );
        let m = bad(tandem_crds::Serving {
            prefix_cache_bytes: Some(-1),
            ..Default::default()
        });
        assert!(m.contains("prefixCacheBytes is -1"), "{m}");
    }
}
