//! Choosing the step: which epoch the deployment is in, what its current
//! group is and what went wrong with it, and what this pass does about it:
//! start a new epoch, keep the group, hold (no plan), back off, or give up.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::{LlamaDeployment, LlamaDeploymentStatus, LlamaShard};
use tandem_planner::{ModelShape, Plan, PlanInput, plan_placement};

use super::blocker::{self, Blocker};
use super::failures::summarize;
use super::progress::{last_progress_at, progress, stalled};
use super::{EpochCause, Failure, ReconcileInput, Settings, detect_failures};
use crate::conditions::{self, READY};
use crate::restart::RestartPolicy;
use crate::{convert, objects, observe, time};

/// The deployment's current group as this pass finds it.
pub(super) struct Group<'a> {
    /// The current epoch: the highest of the status's and the shards'.
    pub(super) epoch: i64,
    /// The current epoch's live shards, by rank.
    pub(super) current: Vec<&'a LlamaShard>,
    /// Names of the live shards of other epochs: to delete.
    pub(super) stale: Vec<String>,
    /// The current group's world size, 0 without a group.
    pub(super) world: u32,
    /// The restart count carried into this pass.
    pub(super) restarts: u32,
    /// What went wrong with the group; empty when nothing did.
    pub(super) failures: Vec<Failure>,
    /// When a group on its way to serving last moved; `None` otherwise.
    pub(super) last_progress: Option<Timestamp>,
}

/// What this pass does with the group.
pub(super) enum Step {
    /// Write a new epoch from `plan`.
    New {
        plan: Plan,
        shape: ModelShape,
        cause: EpochCause,
    },
    /// The group matches the plan: leave it.
    Keep,
    /// No plan exists: leave whatever runs, and say why.
    Hold(Blocker),
    /// The group failed; re-form it at `until`.
    Backoff {
        until: Timestamp,
        failures: Vec<Failure>,
    },
    /// The group failed and the restart budget is spent.
    GiveUp(Vec<Failure>),
}

/// Finds the current epoch and its group, the restarts carried, and the
/// group's failures (a stalled load among them).
pub(super) fn find_group<'a>(input: &ReconcileInput<'a>, settings: &Settings) -> Group<'a> {
    let prior = input.prior;
    let epoch = input
        .shards
        .iter()
        .map(|s| s.spec.epoch)
        .chain([prior.epoch])
        .max()
        .unwrap_or(0);
    let mut current: Vec<&LlamaShard> = input
        .shards
        .iter()
        .copied()
        .filter(|s| s.spec.epoch == epoch && s.metadata.deletion_timestamp.is_none())
        .collect();
    current.sort_by_key(|s| s.spec.rank);
    let mut stale: Vec<String> = input
        .shards
        .iter()
        .filter(|s| s.spec.epoch != epoch && s.metadata.deletion_timestamp.is_none())
        .map(|s| s.name_any())
        .collect();
    let mut world = current
        .iter()
        .map(|s| u32::try_from(s.spec.world_size).unwrap_or(0))
        .max()
        .unwrap_or(0);
    // An epoch whose writing stopped half-way before the status recorded it
    // is not a group that failed: it never existed. Start over without
    // charging the restart budget.
    if epoch > prior.epoch && current.len() < world as usize {
        stale.extend(current.drain(..).map(|s| s.name_any()));
        world = 0;
    }
    let restarts = carried_restarts(input.deployment, prior, &settings.restart, input.now);
    let mut failures = if current.is_empty() {
        Vec::new()
    } else {
        detect_failures(&current, world, input.nodes)
    };
    // A group on its way to serving: when it last moved, and whether it
    // has been still for too long.
    let mut last_progress = None;
    if !current.is_empty() && failures.is_empty() {
        let p = progress(&current, world);
        if p.ready < p.world {
            let since = last_progress_at(prior, epoch, &p.ranks, input.now);
            last_progress = Some(since);
            if let Some(stall) = stalled(&p, since, input.now, settings.load_timeout) {
                failures.push(stall);
            }
        }
    }
    Group {
        epoch,
        current,
        stale,
        world,
        restarts,
        failures,
        last_progress,
    }
}

/// Chooses what this pass does with `group`.
pub(super) fn step(input: &ReconcileInput<'_>, settings: &Settings, group: &Group<'_>) -> Step {
    let plan = plan(input, group);
    let policy = &settings.restart;
    if group.current.is_empty() {
        let cause = if group.epoch == 0 {
            EpochCause::Initial
        } else {
            EpochCause::Replace
        };
        return new_or_hold(plan, |plan, shape| Step::New { plan, shape, cause });
    }
    if !group.failures.is_empty() {
        let last = input.prior.last_restart.as_ref().map(|r| r.time.0);
        let next = policy.next_restart_at(last, group.restarts);
        if policy.exhausted(group.restarts) {
            return Step::GiveUp(group.failures.clone());
        }
        if let Some(until) = next.filter(|t| input.now < *t) {
            return Step::Backoff {
                until,
                failures: group.failures.clone(),
            };
        }
        let (reason, message) = summarize(&group.failures, &group.current);
        return new_or_hold(plan, |plan, shape| Step::New {
            plan,
            shape,
            cause: EpochCause::Restart { reason, message },
        });
    }
    new_or_hold(plan, |plan, shape| {
        let desired =
            objects::build_shards(input.deployment, input.owner, &plan, &shape, group.epoch);
        if same_specs(&desired, &group.current) {
            Step::Keep
        } else if plan.world_size != group.world {
            Step::New {
                cause: EpochCause::Scale {
                    from: group.world,
                    to: plan.world_size,
                },
                plan,
                shape,
            }
        } else {
            Step::New {
                plan,
                shape,
                cause: EpochCause::SpecChange,
            }
        }
    })
}

/// `new` of the plan, or [`Step::Hold`] when there is none.
fn new_or_hold(
    plan: Result<(Plan, ModelShape), Blocker>,
    new: impl FnOnce(Plan, ModelShape) -> Step,
) -> Step {
    match plan {
        Ok((plan, shape)) => new(plan, shape),
        Err(blocker) => Step::Hold(blocker),
    }
}

/// The placement the spec asks for on the nodes that can run its backend,
/// keeping the group's current ranks where they still fit.
fn plan(input: &ReconcileInput<'_>, group: &Group<'_>) -> Result<(Plan, ModelShape), Blocker> {
    let d = input.deployment;
    let request = convert::deployment_request(d)?;
    let shape = convert::resolve_shape(d)?;
    let busy = busy_ports(&group.failures, &group.current);
    let nodes = input
        .nodes
        .iter()
        .filter(|n| !input.mismatched.contains_key(&n.name))
        .cloned()
        .map(|mut n| {
            n.used_ports.extend(
                busy.iter()
                    .filter(|(node, _)| *node == n.name)
                    .map(|(_, p)| *p),
            );
            n
        })
        .collect();
    let plan_input = PlanInput {
        deployment: request,
        shape,
        nodes,
        current: convert::current_ranks(&group.current),
    };
    plan_placement(&plan_input)
        .map(|plan| (plan, shape))
        .map_err(|e| {
            blocker::backend_blocker(
                d.spec.backend,
                e,
                &plan_input.deployment,
                input.nodes,
                input.mismatched,
            )
        })
}

/// The ports failed ranks could not listen on, by node: some other process
/// holds them. The placement keeps a rank's ports while they are free in its
/// books, so without this a port held outside Tandem would fail the group
/// in every epoch until the restart budget ran out. The port the agent's
/// message names (`... control port 29001: address in use`), else the
/// rank's ring and control ports; never the serving port, which the spec
/// fixes.
fn busy_ports(failures: &[Failure], current: &[&LlamaShard]) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for f in failures.iter().filter(|f| address_in_use(&f.detail)) {
        let Some(shard) = current.iter().find(|s| s.spec.rank == f.rank) else {
            continue;
        };
        let node = &shard.spec.node_name;
        match named_port(&f.detail) {
            Some(port) => out.push((node.clone(), port)),
            None => {
                let serving = shard.spec.serving_port;
                out.extend(
                    observe::shard_ports(shard)
                        .into_iter()
                        .filter(|p| serving != Some(i32::from(*p)))
                        .map(|p| (node.clone(), p)),
                );
            }
        }
    }
    out
}

/// Whether an agent's message is a failed bind: its own wording, or MLX's
/// `Couldn't bind socket (error: 98)` (EADDRINUSE on Linux; 48 on macOS).
fn address_in_use(detail: &str) -> bool {
    let lower = detail.to_ascii_lowercase();
    lower.contains("address in use")
        || lower.contains("address already in use")
        || (lower.contains("bind") && (lower.contains("error: 98") || lower.contains("error: 48")))
}

/// The `N` of `port N` in a message.
fn named_port(detail: &str) -> Option<u16> {
    let at = detail.find("port ")?;
    let digits: String = detail[at + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The restart count to carry: reset when the spec changed (a new spec gets
/// a fresh budget) or when the group has served long enough.
fn carried_restarts(
    d: &LlamaDeployment,
    prior: &LlamaDeploymentStatus,
    policy: &RestartPolicy,
    now: Timestamp,
) -> u32 {
    if prior.observed_generation != d.metadata.generation {
        return 0;
    }
    let serving_long = conditions::find(&prior.conditions, READY).is_some_and(|c| {
        c.status == "True" && time::since(now, c.last_transition_time.0) >= policy.reset_after
    });
    if serving_long {
        0
    } else {
        u32::try_from(prior.restart_count).unwrap_or(0)
    }
}

fn same_specs(desired: &[LlamaShard], current: &[&LlamaShard]) -> bool {
    desired.len() == current.len()
        && desired.iter().all(|want| {
            current
                .iter()
                .any(|have| have.spec.rank == want.spec.rank && have.spec == want.spec)
        })
}
