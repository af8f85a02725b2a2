//! The `tandem-operator` binary: flags, tracing, the HTTP endpoints, leader
//! election and the controller; see [`tandem_operator::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = tandem_operator::cli::Cli::parse();
    tandem_operator::telemetry::init(cli.log_format, &cli.log)?;
    tandem_operator::run(cli).await
}
