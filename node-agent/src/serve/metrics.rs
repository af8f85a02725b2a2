//! Rank 0's serving metrics (Prometheus text format at `/metrics`). Labels
//! take values from fixed sets (endpoint, status class, rank number below
//! the world size), never from request contents.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabel {
    rank: i32,
}

/// Serving metrics and their registry.
#[derive(Debug)]
pub struct ServeMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    generated_tokens: Counter,
    prompt_tokens: Counter,
    ttft: Histogram,
    tokens_per_second: Histogram,
    queue_depth: Gauge<i64, AtomicI64>,
    in_flight: Gauge<i64, AtomicI64>,
    rank_ready: Family<RankLabel, Gauge>,
    last_tokens_per_second: Gauge<f64, AtomicU64>,
    cached_tokens: Counter,
    cache_bytes: Gauge<i64, AtomicI64>,
    batch_steps: Counter,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServeMetrics {
    /// Registers every metric under the `tandem_` prefix.
    pub fn new() -> ServeMetrics {
        let mut registry = Registry::with_prefix("tandem");
        let requests = Family::<RequestLabels, Counter>::default();
        let generated_tokens = Counter::default();
        let prompt_tokens = Counter::default();
        // 1 ms to about 65 s.
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        // 0.5 to about 4000 tokens/s.
        let tokens_per_second = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        let in_flight = Gauge::<i64, AtomicI64>::default();
        let rank_ready = Family::<RankLabel, Gauge>::default();
        let last_tokens_per_second = Gauge::<f64, AtomicU64>::default();
        let cached_tokens = Counter::default();
        let cache_bytes = Gauge::<i64, AtomicI64>::default();
        let batch_steps = Counter::default();
        registry.register(
            "prompt_cached_tokens",
            "Prompt tokens taken from the prefix cache instead of prefilled",
            cached_tokens.clone(),
        );
        registry.register(
            "prefix_cache_bytes",
            "Bytes of KV the prefix cache holds on each rank",
            cache_bytes.clone(),
        );
        registry.register(
            "batch_steps",
            "Batched forward steps run by the group",
            batch_steps.clone(),
        );
        registry.register(
            "requests",
            "HTTP API requests answered, by endpoint and status code",
            requests.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a request's start of generation to its first token",
            ttft.clone(),
        );
        registry.register(
            "decode_tokens_per_second",
            "Decode speed of each request (tokens after the first per second)",
            tokens_per_second.clone(),
        );
        registry.register(
            "last_decode_tokens_per_second",
            "Decode speed of the latest request",
            last_tokens_per_second.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a place in the batch",
            queue_depth.clone(),
        );
        registry.register(
            "in_flight",
            "Requests in the running batch",
            in_flight.clone(),
        );
        registry.register(
            "rank_ready",
            "1 while the rank takes part in the group, 0 once it left",
            rank_ready.clone(),
        );
        ServeMetrics {
            registry,
            requests,
            generated_tokens,
            prompt_tokens,
            ttft,
            tokens_per_second,
            queue_depth,
            in_flight,
            rank_ready,
            last_tokens_per_second,
            cached_tokens,
            cache_bytes,
            batch_steps,
        }
    }

    /// Counts prompt tokens served from the prefix cache.
    pub fn cached(&self, tokens: usize) {
        self.cached_tokens.inc_by(tokens as u64);
    }

    /// Records the batch after a step: its size, the queue, the cache.
    pub fn step(&self, running: usize, waiting: usize, cache_bytes: u64) {
        self.batch_steps.inc();
        self.set_in_flight(running);
        self.set_queue_depth(waiting);
        self.cache_bytes
            .set(i64::try_from(cache_bytes).unwrap_or(i64::MAX));
    }

    /// Counts an answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
    }

    /// Records a finished generation.
    pub fn generation(
        &self,
        prompt_tokens: usize,
        generated: usize,
        ttft: Duration,
        decode: Duration,
    ) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generated_tokens.inc_by(generated as u64);
        if generated > 0 {
            self.ttft.observe(ttft.as_secs_f64());
        }
        if generated > 1 && decode > Duration::ZERO {
            let rate = (generated - 1) as f64 / decode.as_secs_f64();
            self.tokens_per_second.observe(rate);
            self.last_tokens_per_second.set(rate);
        }
    }

    /// Sets the queue depth.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Sets the number of requests being generated.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets whether `rank` takes part in the group.
    pub fn set_rank_ready(&self, rank: i32, ready: bool) {
        self.rank_ready
            .get_or_create(&RankLabel { rank })
            .set(i64::from(ready));
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
