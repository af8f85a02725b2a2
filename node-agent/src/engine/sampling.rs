//! Choosing the next token from the logits: greedy, or temperature sampling
//! with optional nucleus (top-p) filtering, as mlx-lm's `make_sampler`.
//!
//! Tensor-parallel ranks must pick the same token without talking: after the
//! last `all_sum` every rank holds bit-identical logits, and the random keys
//! come from the same seed split the same way at every step, so the draws
//! agree too.

use mlx_rs::{Array, ops, random};

use super::error::{EngineError, Result};

/// How to choose tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p`;
    /// 0 or 1 keeps all.
    pub top_p: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A token chooser with its own random stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    key: Array,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
            return Err(EngineError::Argument(format!(
                "temperature must be a finite number >= 0, not {}",
                params.temperature
            )));
        }
        if !(0.0..=1.0).contains(&params.top_p) {
            return Err(EngineError::Argument(format!(
                "top-p must be within 0 and 1, not {}",
                params.top_p
            )));
        }
        let key = random::key(params.seed).map_err(EngineError::mlx("seeding the sampler"))?;
        Ok(Sampler { params, key })
    }

    /// The next token (shape `[1]`) from logits `[1, vocab]`. Lazy.
    pub fn sample(&mut self, logits: &Array) -> Result<Array> {
        self.sample_inner(logits)
            .map_err(EngineError::mlx("sampling"))
    }

    fn sample_inner(&mut self, logits: &Array) -> mlx_rs::error::Result<Array> {
        // mlx-lm samples from log-probabilities in the logits' dtype; argmax
        // ties therefore break the same way.
        let logprobs = logits.subtract(logits.logsumexp(true)?)?;
        if self.params.temperature == 0.0 {
            return ops::indexing::argmax_axis(&logprobs, -1, false);
        }
        let filtered = if self.params.top_p > 0.0 && self.params.top_p < 1.0 {
            top_p(&logprobs, self.params.top_p)?
        } else {
            logprobs
        };
        let (next, draw) = random::split(&self.key, 2)?;
        self.key = next;
        let scaled = filtered.multiply(Array::from_f32(1.0 / self.params.temperature))?;
        random::categorical(&scaled, -1, None, &draw)
    }
}

/// Sets every log-probability below the nucleus threshold to -inf: sorted
/// ascending, tokens are dropped while the mass of the tokens above them
/// already reaches `p` of the total.
fn top_p(logprobs: &Array, p: f32) -> mlx_rs::error::Result<Array> {
    let sorted = ops::sort_axis(logprobs, -1)?;
    let probs = ops::exp(sorted.as_dtype(mlx_rs::Dtype::Float32)?)?;
    let mass_above = probs.cumsum(-1, true, false)?;
    use mlx_rs::ops::indexing::TryIndexOp;
    let total = mass_above
        .try_index((.., ..1))?
        .add(probs.try_index((.., ..1))?)?;
    let dropped = mass_above
        .ge(total.multiply(Array::from_f32(p))?)?
        .sum_axis(-1, true)?;
    let threshold = sorted.take_along_axis(&dropped, -1)?;
    ops::select(
        &logprobs.lt(&threshold)?,
        Array::from_f32(f32::NEG_INFINITY),
        logprobs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Array {
        Array::from_slice(&[0.0f32, 3.0, 1.0, 2.9, -1.0], &[1, 5])
    }

    fn draw(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params).expect("sampler");
        (0..n)
            .map(|_| {
                let t = s.sample(&logits()).expect("sample");
                t.eval().expect("eval");
                t.as_dtype(mlx_rs::Dtype::Uint32)
                    .expect("cast")
                    .item_cast::<u32>()
            })
            .collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        assert_eq!(draw(SamplingParams::default(), 3), vec![1, 1, 1]);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let a = draw(params, 20);
        assert_eq!(a, draw(params, 20));
        assert!(
            a.iter().any(|t| *t != 1),
            "temperature 1 should not always pick the argmax: {a:?}"
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p(1) ≈ 0.47 and p(3) ≈ 0.43: a nucleus of 0.5 holds tokens 1 and 3 only.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
        };
        let tokens = draw(params, 40);
        assert!(tokens.iter().all(|t| *t == 1 || *t == 3), "{tokens:?}");
        assert!(tokens.contains(&1) && tokens.contains(&3), "{tokens:?}");
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(
            Sampler::new(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                top_p: 1.5,
                ..Default::default()
            })
            .is_err()
        );
    }
}
