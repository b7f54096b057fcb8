//! `quern`: servers, local clusters, file verbs and benchmarks in one binary.

// `bench namenode` prints its figures with one `serde_json::json!` object,
// whose macro recursion outgrows the default limit.
#![recursion_limit = "256"]

mod bench;
mod bench_fuse;
mod bench_io;
mod bench_namenode;
mod bench_stats;
mod bench_train;
mod cluster;
mod dataset;
mod demo;
mod duration;
mod fs;
mod model;
mod mount;
mod plot;
mod servers;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

// Every request allocates and frees small buffers on both async workers
// (frames, QUIC stream state, sled views); glibc's malloc took about 13%
// of the namenode's and the clients' CPU in `bench namenode`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Client certificate to act as (instead of the configuration's).
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Key of --cert.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Cluster CA certificate to trust (instead of the configuration's).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a namenode in the foreground, or format its directory.
    Namenode(servers::NamenodeCmd),
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
    /// The main job: a local cluster, Fashion-MNIST, a CNN trained on the datanodes, a score.
    Demo(demo::DemoArgs),
    /// Train a Keras-defined model on a dataset with gradient tasks on the datanodes.
    Train(train::TrainArgs),
    /// Accuracy, loss and confusion matrix of a trained model, by map tasks.
    Score(train::ScoreArgs),
    /// Mount the cluster (or a directory of it) as a local filesystem.
    Mount(mount::MountArgs),
    /// Unmount a quern mount.
    Umount(mount::UmountArgs),
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
    // Die quietly on a closed pipe (`quern ls | head`), as Unix tools do,
    // instead of panicking in println!.
    // SAFETY: restoring the default disposition of one signal at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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

/// Certificate files given on the command line, which replace the ones
/// the client configuration names (servers take them as their identity).
#[derive(Default, Clone)]
pub struct IdentityFlags {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

static IDENTITY: std::sync::OnceLock<IdentityFlags> = std::sync::OnceLock::new();

pub fn identity_flags() -> IdentityFlags {
    IDENTITY.get().cloned().unwrap_or_default()
}

/// The client configuration (`--config`, `$QUERN_CONFIG`, the default
/// file) with any `--cert/--key/--ca` given applied over it.
pub fn client_config(
    config: Option<&std::path::Path>,
) -> Result<quern_proto::config::ClientConfig> {
    let mut cfg = quern_proto::config::ClientConfig::discover(config)?;
    let flags = identity_flags();
    if let Some(c) = flags.cert {
        cfg.cert = c;
    }
    if let Some(k) = flags.key {
        cfg.key = k;
    }
    if let Some(ca) = flags.ca {
        cfg.ca = ca;
    }
    Ok(cfg)
}

async fn run(cli: Cli) -> Result<i32> {
    let _ = IDENTITY.set(IdentityFlags {
        cert: cli.cert.clone(),
        key: cli.key.clone(),
        ca: cli.ca.clone(),
    });
    match cli.command {
        Command::Namenode(a) => servers::namenode(a).await.map(|_| 0),
        Command::Datanode(a) => servers::datanode(a).await.map(|_| 0),
        Command::Cluster(c) => cluster::run(c).await,
        Command::Bench(b) => bench::run(b).await.map(|_| 0),
        Command::Dataset(d) => dataset::run(d, cli.config.as_deref()).await,
        Command::Model(m) => model::run(m, cli.config.as_deref()).await.map(|_| 0),
        Command::Demo(d) => demo::run(d).await,
        Command::Train(t) => train::train(t, cli.config.as_deref()).await,
        Command::Score(s) => train::score(s, cli.config.as_deref()).await,
        Command::Mount(m) => mount::mount(m, cli.config.as_deref()).await,
        Command::Umount(u) => mount::umount(u).await,
        Command::Fs(f) => fs::run(f, cli.config.as_deref()).await,
    }
}
