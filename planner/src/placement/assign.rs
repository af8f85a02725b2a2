//! Choosing a node and ports for every rank: the stable assignment the
//! module docs of [`placement`](super) describe.

use std::collections::{BTreeMap, BTreeSet};

use super::{CurrentRank, DeploymentRequest, NodeInfo, PlanInput, RankPlacement};
use crate::model::ModelShape;

/// One planning run over normalized input.
pub(super) struct Planner<'a> {
    pub(super) d: &'a DeploymentRequest,
    pub(super) shape: &'a ModelShape,
    pub(super) memory: u64,
    /// Nodes by name, one per name.
    pub(super) nodes: BTreeMap<&'a str, &'a NodeInfo>,
    /// Current ranks below the world size, in rank order, at most one per
    /// rank and one per node.
    pub(super) current: Vec<&'a CurrentRank>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(input: &'a PlanInput, memory: u64) -> Self {
        let mut sorted: Vec<&NodeInfo> = input.nodes.iter().collect();
        sorted.sort();
        let mut nodes = BTreeMap::new();
        for n in sorted {
            nodes.entry(n.name.as_str()).or_insert(n);
        }

        let mut current: Vec<&CurrentRank> = input
            .current
            .iter()
            .filter(|c| c.rank < input.deployment.world_size)
            .collect();
        current.sort();
        let mut ranks = BTreeSet::new();
        let mut hosts = BTreeSet::new();
        current.retain(|c| ranks.insert(c.rank) && hosts.insert(c.node.as_str()));

        Planner {
            d: &input.deployment,
            shape: &input.shape,
            memory,
            nodes,
            current,
        }
    }

    /// Matches the selector, is Ready and has room for a rank's memory.
    pub(super) fn can_run(&self, n: &NodeInfo) -> bool {
        n.ready && self.d.selector.matches(&n.labels) && n.free_bytes() >= self.memory
    }

    /// Whether `port` is free for this deployment's rank on `n`.
    pub(super) fn port_free(&self, n: &NodeInfo, port: u16, rank0: bool) -> bool {
        n.port_range.contains(port)
            && !n.used_ports.contains(&port)
            && !(rank0 && port == self.d.serving_port)
    }

    /// The lowest free ring port (and control port, for rank 0) on `n`;
    /// `None` when they are not there or rank 0 cannot serve on `n`.
    pub(super) fn free_ports(&self, n: &NodeInfo, rank0: bool) -> Option<(u16, Option<u16>)> {
        if rank0 && n.used_ports.contains(&self.d.serving_port) {
            return None;
        }
        let mut free = n
            .port_range
            .ports()
            .filter(|&p| self.port_free(n, p, rank0));
        let ring = free.next()?;
        let control = if rank0 { Some(free.next()?) } else { None };
        Some((ring, control))
    }

    pub(super) fn placement(
        &self,
        rank: u32,
        n: &NodeInfo,
        ports: (u16, Option<u16>),
    ) -> RankPlacement {
        RankPlacement {
            rank,
            node: n.name.clone(),
            address: n.address.clone(),
            ring_port: ports.0,
            control_port: ports.1,
        }
    }

    /// The current rank's placement if it may stay on its node: same ports
    /// when they are still free, else new ones.
    pub(super) fn keep(&self, cur: &CurrentRank) -> Option<RankPlacement> {
        let n = *self.nodes.get(cur.node.as_str())?;
        if !self.can_run(n) {
            return None;
        }
        let rank0 = cur.rank == 0;
        let same_ports = if rank0 {
            match cur.control_port {
                Some(control)
                    if control != cur.ring_port
                        && !n.used_ports.contains(&self.d.serving_port)
                        && self.port_free(n, cur.ring_port, true)
                        && self.port_free(n, control, true) =>
                {
                    Some((cur.ring_port, Some(control)))
                }
                _ => None,
            }
        } else if self.port_free(n, cur.ring_port, false) {
            Some((cur.ring_port, None))
        } else {
            None
        };
        let ports = same_ports.or_else(|| self.free_ports(n, rank0))?;
        Some(self.placement(cur.rank, n, ports))
    }

    /// Places every rank, keeping current ranks when `keep` is set. `None`
    /// when the nodes cannot hold the group.
    pub(super) fn assign(&self, keep: bool) -> Option<Vec<RankPlacement>> {
        let mut placed: BTreeMap<u32, RankPlacement> = BTreeMap::new();
        if keep {
            for cur in &self.current {
                if let Some(p) = self.keep(cur) {
                    placed.insert(cur.rank, p);
                }
            }
        }
        let taken: BTreeSet<String> = placed.values().map(|p| p.node.clone()).collect();
        let mut candidates: Vec<&NodeInfo> = self
            .nodes
            .values()
            .copied()
            .filter(|n| !n.unschedulable && !taken.contains(&n.name) && self.can_run(n))
            .collect();
        candidates.sort_by(|a, b| {
            b.free_bytes()
                .cmp(&a.free_bytes())
                .then_with(|| a.name.cmp(&b.name))
        });

        if !placed.contains_key(&0) {
            let host = match candidates
                .iter()
                .position(|n| self.free_ports(n, true).is_some())
            {
                Some(i) => candidates.remove(i),
                None => {
                    // Only kept ranks sit on nodes that can serve: move the
                    // lowest of them, so that the group can have a rank 0.
                    let (&rank, p) = placed.iter().find(|(_, p)| {
                        self.nodes
                            .get(p.node.as_str())
                            .is_some_and(|n| !n.unschedulable && self.free_ports(n, true).is_some())
                    })?;
                    let n = *self.nodes.get(p.node.as_str())?;
                    placed.remove(&rank);
                    n
                }
            };
            placed.insert(0, self.placement(0, host, self.free_ports(host, true)?));
        }

        for rank in 1..self.d.world_size {
            if placed.contains_key(&rank) {
                continue;
            }
            let i = candidates
                .iter()
                .position(|n| self.free_ports(n, false).is_some())?;
            let n = candidates.remove(i);
            placed.insert(rank, self.placement(rank, n, self.free_ports(n, false)?));
        }
        Some(placed.into_values().collect())
    }
}
