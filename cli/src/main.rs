//! `quern`: servers, local clusters, file verbs and benchmarks in one binary.

mod bench;
mod bench_io;
mod bench_stats;
mod cluster;
mod dataset;
mod duration;
mod fs;
mod model;
mod servers;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "quern",
    version,
    about = "A distributed block filesystem that computes where its data lives"
)]
struct Cli {
    /// Client configuration (else $QUERN_CONFIG, else ~/.config/quern/client.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a namenode in the foreground.
    Namenode(servers::NamenodeArgs),
    /// Run a datanode in the foreground.
    Datanode(servers::DatanodeArgs),
    /// Make, start, inspect and stop local clusters.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Datasets of fixed-size records: import, info, stats, export.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Inspect, run and benchmark Keras-defined models locally.
    #[command(subcommand)]
    Model(model::ModelCommand),
    #[command(flatten)]
    Fs(fs::FsCommand),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,quern=info,quern_namenode=info,quern_datanode=info",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quern: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("quern: {e:#}");
            1
        }
    };
    // Background tasks (lease renewers, connections) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Namenode(a) => servers::namenode(a).await.map(|_| 0),
        Command::Datanode(a) => servers::datanode(a).await.map(|_| 0),
        Command::Cluster(c) => cluster::run(c).await,
        Command::Bench(b) => bench::run(b).await.map(|_| 0),
        Command::Dataset(d) => dataset::run(d, cli.config.as_deref()).await,
        Command::Model(m) => model::run(m).map(|_| 0),
        Command::Fs(f) => fs::run(f, cli.config.as_deref()).await,
    }
}
