//! A step's plan in its wire form and back.

use super::*;
use crate::engine::batch::{Admit, Feed, Reuse, Save, StepPlan};
use crate::engine::sampling::SamplingParams;

/// The wire form of a step.
pub fn plan_to_proto(plan: &StepPlan) -> pb::Step {
    let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::Step {
        step: plan.step,
        evict: plan.evict.clone(),
        save: plan
            .save
            .iter()
            .map(|s| pb::Save {
                id: s.id,
                entry: s.entry,
                tokens: narrow(s.tokens),
            })
            .collect(),
        retire: plan.retire.clone(),
        admit: plan
            .admit
            .iter()
            .map(|a| pb::Admit {
                id: a.id,
                prompt_ids: a.prompt.clone(),
                temperature: a.sampling.temperature,
                top_p: a.sampling.top_p,
                seed: a.sampling.seed,
                reuse_entry: a.reuse.map_or(0, |r| r.entry),
                reuse_tokens: a.reuse.map_or(0, |r| narrow(r.tokens)),
            })
            .collect(),
        feed: plan
            .feed
            .iter()
            .map(|f| pb::Feed {
                id: f.id,
                prompt_tokens: narrow(f.prompt_tokens),
            })
            .collect(),
    }
}

/// A step from the wire. Log-probabilities are rank 0's alone, so an
/// admitted sequence asks for none here.
pub fn plan_from_proto(step: pb::Step) -> StepPlan {
    let widen = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    StepPlan {
        step: step.step,
        evict: step.evict,
        save: step
            .save
            .into_iter()
            .map(|s| Save {
                id: s.id,
                entry: s.entry,
                tokens: widen(s.tokens),
            })
            .collect(),
        retire: step.retire,
        admit: step
            .admit
            .into_iter()
            .map(|a| Admit {
                id: a.id,
                prompt: a.prompt_ids,
                sampling: SamplingParams {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                },
                reuse: (a.reuse_tokens > 0).then(|| Reuse {
                    entry: a.reuse_entry,
                    tokens: widen(a.reuse_tokens),
                }),
                logprobs: None,
            })
            .collect(),
        feed: step
            .feed
            .into_iter()
            .map(|f| Feed {
                id: f.id,
                prompt_tokens: widen(f.prompt_tokens),
            })
            .collect(),
    }
}
