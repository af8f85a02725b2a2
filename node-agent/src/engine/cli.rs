//! The `make-model` and `generate` subcommands: their arguments and what
//! they print. `main` only dispatches here.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::config::ModelConfig;
use super::error::{EngineError, Result};
use super::launch;
use super::make_model::{self, ModelSpec, WeightFormat};
use super::model::{self, ComputeDtype};
use super::run::{GenerateRequest, Prompt, RankReport, run_rank};
use super::sampling::SamplingParams;
use crate::mlx::distributed::{Backend, Group};

/// Arguments of `make-model`.
#[derive(Debug, Args)]
pub struct MakeModelArgs {
    /// Directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Shape of a bundled model: llama-3.2-1b, llama-3.2-3b, llama-3.1-8b,
    /// llama-3.1-70b, llama-3.3-70b, or a catalog ID such as
    /// mlx-community/Llama-3.2-1B-Instruct-4bit (which also sets --quant).
    #[arg(long)]
    pub preset: Option<String>,
    /// Transformer blocks [default: 4].
    #[arg(long)]
    pub layers: Option<usize>,
    /// Residual width [default: 256].
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Query heads [default: 8].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads [default: 4].
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Per-head width [default: hidden / heads].
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// MLP width [default: 512].
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Vocabulary size [default: 512].
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Tie lm_head to the embedding: true or false [default: true].
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    /// Storage: 4 or 8 (MLX affine, group size 64), bf16 or fp16 [default: 4].
    #[arg(long)]
    pub quant: Option<String>,
    /// Split the weights over this many files with an index.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// Send the prompt as a user message through the chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 100)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass; 1 keeps every token.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run N local ranks in tensor parallel over the ring backend (loopback).
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// MLX distributed backend of a rank started elsewhere (--worker): ring,
    /// or jaccl between Macs with Thunderbolt RDMA. Local groups use ring.
    #[arg(long, default_value = "ring")]
    pub backend: Backend,
    /// Activation dtype: auto (float32 for quantized models on the CPU, else
    /// the model's), model (exactly mlx-lm's arithmetic), or float32.
    #[arg(long, default_value = "auto")]
    pub compute_dtype: ComputeDtype,
    /// Print one JSON object: prompt and generated ids, text, timings, bytes
    /// read, peak memory.
    #[arg(long)]
    pub json: bool,
    /// Use these comma-separated token ids as the prompt.
    #[arg(long, hide = true, value_delimiter = ',', conflicts_with = "prompt")]
    pub prompt_ids: Option<Vec<u32>>,
    /// Write the prefill's last-position logits (JSON) to this file.
    #[arg(long, hide = true)]
    pub dump_logits: Option<PathBuf>,
    /// Keep generating through end-of-sequence tokens (benchmarks).
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
    /// Run a short untimed generation before the measured one (benchmarks).
    #[arg(long, hide = true)]
    pub warmup: bool,
    /// Run as one rank of a group (MLX_HOSTFILE and MLX_RANK set), printing
    /// this rank's report as one JSON line.
    #[arg(long, hide = true)]
    pub worker: bool,
}

/// `make-model`: writes the model and says where.
pub fn make_model(args: MakeModelArgs) -> Result<()> {
    let mut spec = match &args.preset {
        Some(name) => make_model::preset(name)?,
        None => ModelSpec::tiny(),
    };
    let explicit_head_dim = args.head_dim;
    spec.layers = args.layers.unwrap_or(spec.layers);
    spec.hidden = args.hidden.unwrap_or(spec.hidden);
    spec.heads = args.heads.unwrap_or(spec.heads);
    spec.kv_heads = args.kv_heads.unwrap_or(spec.kv_heads);
    spec.intermediate = args.intermediate.unwrap_or(spec.intermediate);
    spec.vocab = args.vocab.unwrap_or(spec.vocab);
    spec.tied = args.tie_embeddings.unwrap_or(spec.tied);
    if let Some(q) = &args.quant {
        spec.format = WeightFormat::parse(q)?;
    }
    spec.head_dim = match explicit_head_dim {
        Some(d) => d,
        None if spec.heads > 0 => spec.hidden / spec.heads,
        None => 0,
    };
    let started = std::time::Instant::now();
    let report = make_model::write_model(&spec, &args.out, args.shards, args.seed)?;
    eprintln!(
        "wrote {} ({} file(s), {:.1} MB of tensors) in {:.1}s",
        report.dir.display(),
        report.files.len(),
        report.tensor_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn request_of(args: &GenerateArgs) -> GenerateRequest {
    let prompt = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => Prompt::Ids(ids.clone()),
        (None, Some(text)) if args.chat => Prompt::Chat {
            system: args.system.clone(),
            user: text.clone(),
        },
        (None, text) => Prompt::Text(text.clone().unwrap_or_default()),
    };
    GenerateRequest {
        model: args.model.clone(),
        prompt,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        ignore_eos: args.ignore_eos,
        dump_logits: args.dump_logits.clone(),
        compute: args.compute_dtype,
        warmup: args.warmup,
    }
}

/// `generate`: one process, a local group (`--world-size N`), or one rank
/// of a group (`--worker`).
pub fn generate(args: GenerateArgs) -> Result<()> {
    let request = request_of(&args);
    if args.worker {
        let group = Group::join(args.backend)?;
        let report = run_rank(&request, Some(group), None)?;
        println!("{}", json_text(&report)?);
        return Ok(());
    }
    if args.world_size == 0 {
        return Err(EngineError::Argument(
            "--world-size must be at least 1".into(),
        ));
    }
    if args.world_size == 1 {
        let mut stdout = std::io::stdout();
        let mut stream = |text: &str| {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        };
        let sink: Option<&mut dyn FnMut(&str)> = if args.json { None } else { Some(&mut stream) };
        let report = run_rank(&request, None, sink)?;
        return print_result(&args, &report, &[]);
    }

    // A local group: validate the split first, so a bad world size is one
    // clear message instead of N failing ranks.
    if args.backend != Backend::Ring {
        return Err(EngineError::Argument(format!(
            "a local group (--world-size {}) runs over the ring backend on loopback; \
             --backend {} is for ranks started elsewhere with --worker",
            args.world_size, args.backend
        )));
    }
    let config = ModelConfig::load(&args.model)?;
    model::check_world_size(&config, args.world_size)?;
    let program = std::env::current_exe().map_err(EngineError::io("the running executable"))?;
    let mut child_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    child_args.push("--worker".into());

    let outputs = launch::run_local_group(&program, &child_args, args.world_size)?;
    let mut reports = Vec::with_capacity(outputs.len());
    for out in outputs {
        let line = out.stdout.lines().last().unwrap_or_default();
        let report: RankReport = serde_json::from_str(line).map_err(|e| {
            EngineError::Argument(format!(
                "rank {} printed no report ({e}): {}",
                out.rank, out.stdout
            ))
        })?;
        reports.push(report);
    }
    let Some(first) = reports.first().cloned() else {
        return Err(EngineError::Argument("no rank reported".into()));
    };
    for r in &reports[1..] {
        if r.generated_ids != first.generated_ids {
            return Err(EngineError::Argument(format!(
                "ranks disagree: rank 0 generated {:?}, rank {} generated {:?}",
                first.generated_ids, r.rank, r.generated_ids
            )));
        }
    }
    if !args.json {
        print!("{}", first.text);
    }
    print_result(&args, &first, &reports)
}

fn print_result(args: &GenerateArgs, report: &RankReport, ranks: &[RankReport]) -> Result<()> {
    let t = &report.timings;
    if args.json {
        let mut value = serde_json::to_value(report).map_err(|source| EngineError::Json {
            path: "<report>".into(),
            source,
        })?;
        if let Some(map) = value.as_object_mut() {
            map.remove("rank");
            let per_rank: Vec<serde_json::Value> = ranks
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "rank": r.rank,
                        "bytes_read": r.bytes_read,
                        "peak_rss_bytes": r.peak_rss_bytes,
                        "mlx_peak_memory_bytes": r.mlx_peak_memory_bytes,
                        "load_seconds": r.timings.load_seconds,
                    })
                })
                .collect();
            if !per_rank.is_empty() {
                map.insert("ranks".into(), per_rank.into());
            }
        }
        println!("{value}");
        return Ok(());
    }
    println!();
    eprintln!("==========");
    eprintln!(
        "Prompt: {} tokens, {:.3} tokens-per-sec (TTFT {:.3}s)",
        report.prompt_ids.len(),
        t.prefill_tokens_per_second,
        t.time_to_first_token_seconds
    );
    eprintln!(
        "Generation: {} tokens, {:.3} tokens-per-sec ({})",
        report.generated_ids.len(),
        t.decode_tokens_per_second,
        report.finish_reason
    );
    eprintln!(
        "Load: {:.2}s, {:.1} MB read of {:.1} MB; peak RSS {:.1} MB; world size {}",
        t.load_seconds,
        report.bytes_read as f64 / 1e6,
        report.checkpoint_bytes as f64 / 1e6,
        report.peak_rss_bytes.unwrap_or(0) as f64 / 1e6,
        report.world_size
    );
    Ok(())
}

fn json_text<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|source| EngineError::Json {
        path: "<report>".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::engine::make_model::ModelSpec;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MakeModelArgs,
    }

    /// The help's defaults are written out for readers; they must be the
    /// tiny model's, which `ModelSpec::tiny()` takes from the planner.
    #[test]
    fn make_model_help_names_the_tiny_models_shape() {
        let help = Cli::command().render_long_help().to_string();
        let tiny = ModelSpec::tiny();
        for (flag, value) in [
            ("--layers", tiny.layers),
            ("--hidden", tiny.hidden),
            ("--heads", tiny.heads),
            ("--kv-heads", tiny.kv_heads),
            ("--intermediate", tiny.intermediate),
            ("--vocab", tiny.vocab),
        ] {
            let at = help.find(flag).expect(flag);
            let line_end = help[at..]
                .find("[default: ")
                .map(|i| at + i)
                .expect("a default");
            let shown = &help[line_end + "[default: ".len()..];
            let shown = &shown[..shown.find(']').expect("]")];
            assert_eq!(shown, value.to_string(), "{flag}");
        }
        assert!(
            help.contains(&format!("[default: {}]", tiny.tied)),
            "{help}"
        );
    }
}
