//! `tandem-agent`: the Tandem node agent's command line.
//!
//! - `make-model` writes a random-weight Llama checkpoint (mlx-community
//!   layout) for tests, demos and benchmarks.
//! - `generate` runs a model like `mlx_lm.generate`, alone or as a local
//!   tensor-parallel group over the ring backend (`--world-size N`).
//! - `ring-selftest` (hidden) proves that the distributed group forms and sums.
//! - `serve` serves a model from this machine as a local group (no
//!   Kubernetes).
//! - `download` fetches a model the way the agent does, ahead of time.
//! - `join` gives a node its own identity in the cluster (run by an admin).
//! - `run` is the node agent daemon; `worker` (hidden) is one rank worker,
//!   started by `run`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mlx_rs::Array;
use tandem_agent::engine::cli::{self, GenerateArgs, MakeModelArgs};
use tandem_agent::mlx::distributed::{Backend, Group};

#[derive(Debug, Parser)]
#[command(name = "tandem-agent", version, about = "Tandem node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a random-weight Llama model in the mlx-community layout.
    MakeModel(MakeModelArgs),
    /// Generate text from a model directory (like mlx_lm.generate).
    Generate(GenerateArgs),
    /// Join an MLX distributed group (peers from MLX_HOSTFILE, rank from
    /// MLX_RANK), all_sum known values and print the sums as one JSON line.
    #[command(hide = true)]
    RingSelftest {
        /// MLX distributed backend: ring, jaccl, any, ...
        #[arg(long, default_value = "ring")]
        backend: Backend,
    },
    /// Give a node its own identity (ServiceAccount, rights to its own
    /// LlamaNode and Lease) and write its agent's kubeconfig; run by an admin.
    Join(tandem_agent::agent::join::JoinArgs),
    /// Run the node agent: register this node, keep its Lease, and run the
    /// LlamaShards assigned to it.
    Run(tandem_agent::agent::config::RunArgs),
    /// Serve a model from this machine, without Kubernetes: a group of rank
    /// workers on loopback and the OpenAI-compatible API on rank 0.
    Serve(tandem_agent::agent::local::ServeArgs),
    /// Download a model into a directory (Hugging Face cache layout),
    /// verified, the way the agent does for a shard; prints its directory.
    Download(tandem_agent::agent::models::DownloadArgs),
    /// Print firewall rules (nftables or pf) that open the MLX ring ports
    /// of the ranks running on this node to their groups' peers only.
    FirewallRules(tandem_agent::agent::firewall::FirewallArgs),
    /// Run one rank of a shard (started by `run`; reads its launch message
    /// from stdin, reports events on stdout).
    #[command(hide = true)]
    Worker,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::MakeModel(args) => Ok(cli::make_model(args)?),
        Command::Generate(args) => Ok(cli::generate(args)?),
        Command::RingSelftest { backend } => ring_selftest(backend),
        Command::Join(args) => {
            init_logging();
            runtime()?.block_on(tandem_agent::agent::join::join(args))
        }
        Command::Run(args) => {
            init_logging();
            runtime()?.block_on(tandem_agent::agent::run(args))?;
            Ok(())
        }
        Command::Serve(args) => {
            init_logging();
            runtime()?.block_on(tandem_agent::agent::local::serve(args))
        }
        Command::FirewallRules(args) => tandem_agent::agent::firewall::main(args),
        Command::Download(args) => {
            init_logging();
            let dir = runtime()?.block_on(tandem_agent::agent::models::download_command(args))?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Worker => {
            init_logging();
            runtime()?.block_on(tandem_agent::worker::main())
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A worker's stderr is a pipe to its agent; once the agent is gone,
        // reporting the failed write would panic the logging thread.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Sums two arrays over the group: ones (each element sums to the world size)
/// and `[rank, rank + 1, 2 * rank]` (sums with a closed form per element), so the
/// caller can check that every rank took part exactly once.
fn ring_selftest(backend: Backend) -> anyhow::Result<()> {
    let group = Group::join(backend).context("joining the group")?;
    let rank = group.rank();
    let size = group.size();

    let ones = Array::ones::<f32>(&[4]).context("building ones")?;
    let r = rank as f32;
    let ranked = Array::from_slice(&[r, r + 1.0, 2.0 * r], &[3]);

    let sum_of_ones = group.all_sum(&ones)?;
    let sum_of_ranked = group.all_sum(&ranked)?;
    mlx_rs::transforms::eval([&sum_of_ones, &sum_of_ranked]).context("evaluating all_sum")?;

    let report = serde_json::json!({
        "rank": rank,
        "size": size,
        "backend": backend.as_str(),
        "sum_of_ones": sum_of_ones.as_slice::<f32>(),
        "sum_of_ranked": sum_of_ranked.as_slice::<f32>(),
    });
    println!("{report}");
    Ok(())
}
