//! Why no placement exists, in words a user can act on: what matched,
//! what was missing, and the world sizes that would fit.

use std::collections::BTreeSet;

use super::NodeInfo;
use super::assign::Planner;
use crate::error::PlanError;
use crate::model::{MAX_WORLD_SIZE, memory_per_rank, valid_world_sizes};
use crate::text::{gib, nodes_have, or_list, ranks_requested, short_list};

/// Diagnoses list at most five nodes.
fn short_list_5(items: &[String]) -> String {
    short_list(items, 5)
}

impl Planner<'_> {
    /// World sizes that enough of `nodes` could hold, memory-wise, with the
    /// memory each rank would need.
    fn sizes_that_fit(&self, nodes: &[&NodeInfo]) -> Vec<(u32, u64)> {
        valid_world_sizes(self.shape, MAX_WORLD_SIZE)
            .into_iter()
            .filter_map(|size| {
                let need = memory_per_rank(self.shape, size, self.d.budget).total();
                let fitting = nodes.iter().filter(|n| n.free_bytes() >= need).count();
                (fitting >= size as usize).then_some((size, need))
            })
            .collect()
    }

    /// Explains why [`assign`](Self::assign) found no placement.
    pub(super) fn diagnose(&self) -> PlanError {
        let w = self.d.world_size;
        let selector = &self.d.selector;
        let hosts: BTreeSet<&str> = self.current.iter().map(|c| c.node.as_str()).collect();
        let matching: Vec<&NodeInfo> = self
            .nodes
            .values()
            .copied()
            .filter(|n| selector.matches(&n.labels))
            .collect();
        let not_ready = matching.iter().filter(|n| !n.ready).count();
        let cordoned = matching
            .iter()
            .filter(|n| n.ready && n.unschedulable && !hosts.contains(n.name.as_str()))
            .count();
        let usable: Vec<&NodeInfo> = matching
            .iter()
            .copied()
            .filter(|n| n.ready && (!n.unschedulable || hosts.contains(n.name.as_str())))
            .collect();
        let fits = self.sizes_that_fit(&usable);

        if usable.len() < w as usize {
            let matched = if selector.is_empty() {
                match matching.len() {
                    0 => "no LlamaNodes are registered".to_owned(),
                    1 => "1 LlamaNode is registered".to_owned(),
                    m => format!("{m} LlamaNodes are registered"),
                }
            } else {
                match matching.len() {
                    0 => format!("no LlamaNodes match selector {selector}"),
                    1 => format!("1 node matches selector {selector}"),
                    m => format!("{m} nodes match selector {selector}"),
                }
            };
            let mut message = matched;
            if usable.len() < matching.len() {
                let mut why = Vec::new();
                if not_ready > 0 {
                    why.push(format!("{not_ready} not ready"));
                }
                if cordoned > 0 {
                    why.push(format!("{cordoned} cordoned"));
                }
                message.push_str(&format!(
                    ", of which {} ready and schedulable ({}),",
                    match usable.len() {
                        1 => "1 is".to_owned(),
                        u => format!("{u} are"),
                    },
                    why.join(", ")
                ));
            }
            message.push_str(&format!(" but {}; ", ranks_requested(w)));
            let mut options = Vec::new();
            if let Some((size, _)) = fits.last() {
                options.push(format!("scale to {size}"));
            }
            if usable.len() < matching.len() {
                options.push("uncordon or repair nodes".to_owned());
            }
            options.push(if selector.is_empty() {
                "start tandem-agent on more machines".to_owned()
            } else {
                "label more nodes".to_owned()
            });
            message.push_str(&or_list(&options));
            return PlanError::NoMatchingNodes {
                world_size: w,
                eligible_nodes: u32::try_from(usable.len()).unwrap_or(u32::MAX),
                message,
            };
        }

        let (fitting, short): (Vec<&NodeInfo>, Vec<&NodeInfo>) = usable
            .iter()
            .copied()
            .partition(|n| n.free_bytes() >= self.memory);
        if fitting.len() < w as usize {
            let mut short = short;
            short.sort_by(|a, b| {
                b.free_bytes()
                    .cmp(&a.free_bytes())
                    .then_with(|| a.name.cmp(&b.name))
            });
            let shortfalls: Vec<String> = short
                .iter()
                .map(|n| format!("node {} has {} free", n.name, gib(n.free_bytes())))
                .collect();
            let budget = self.d.budget;
            let held = if budget.cache_bytes > 0 {
                format!(
                    "weights, a {}-token KV cache for the batch and a {} prefix cache",
                    budget.kv_tokens,
                    gib(budget.cache_bytes)
                )
            } else {
                format!("weights and a {}-token KV cache", budget.kv_tokens)
            };
            let mut message = format!(
                "{} and each rank needs {} ({held}), but only {} of the {} eligible nodes \
                 have that much free ({}); ",
                ranks_requested(w),
                gib(self.memory),
                fitting.len(),
                usable.len(),
                short_list_5(&shortfalls)
            );
            if !fits.is_empty() {
                let options: Vec<String> = fits
                    .iter()
                    .map(|(size, need)| format!("{size} ({} per rank)", gib(*need)))
                    .collect();
                message.push_str(&format!(
                    "world sizes that would fit: {}; or ",
                    options.join(", ")
                ));
            }
            message.push_str(
                "free memory on these nodes, add nodes, or lower spec.serving.maxBatchTokens \
                 (at least spec.maxContextTokens) or spec.serving.prefixCacheBytes",
            );
            return PlanError::InsufficientMemory {
                world_size: w,
                bytes_per_rank: self.memory,
                message,
            };
        }

        // Enough nodes with enough memory: ports are what is missing.
        let serving = self.d.serving_port;
        let problems: Vec<String> = fitting
            .iter()
            .filter_map(|n| {
                if self.free_ports(n, false).is_none() {
                    Some(format!(
                        "node {} has no free port in {}",
                        n.name, n.port_range
                    ))
                } else if n.used_ports.contains(&serving) {
                    Some(format!(
                        "node {} has serving port {serving} in use, so it cannot run rank 0",
                        n.name
                    ))
                } else if self.free_ports(n, true).is_none() {
                    Some(format!(
                        "node {} has one free port in {}, and rank 0 needs two",
                        n.name, n.port_range
                    ))
                } else {
                    None
                }
            })
            .collect();
        let eligible = fitting.len() - problems.len();
        PlanError::NoMatchingNodes {
            world_size: w,
            eligible_nodes: u32::try_from(eligible).unwrap_or(u32::MAX),
            message: format!(
                "{} and {} the memory, but not the ports ranks need ({}); widen the \
                 agents' port ranges, change spec.serving.port, or label more nodes",
                ranks_requested(w),
                nodes_have(fitting.len()),
                if problems.is_empty() {
                    "one rank per node".to_owned()
                } else {
                    short_list_5(&problems)
                }
            ),
        }
    }
}
