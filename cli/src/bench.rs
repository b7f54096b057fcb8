//! `quern bench`: benchmarks that print figures, baselines and ratios.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Put/get throughput and metadata rates on a local 3-datanode cluster,
    /// with transport and disk ceilings measured in the same run.
    Io {
        #[arg(long)]
        dir: PathBuf,
        /// Bytes per transfer, like 1G or 256M.
        #[arg(long, default_value = "1GiB", value_parser = quern_proto::size::parse_size)]
        size: u64,
        /// Files per metadata measurement.
        #[arg(long, default_value_t = 2000)]
        files: usize,
        /// Scrape every node's /metrics this often while measuring, as a
        /// Prometheus server would (to see what serving them costs).
        #[arg(long, value_parser = crate::duration::parse)]
        scrape: Option<std::time::Duration>,
    },
    /// The FUSE mount against `quern get`/`quern put` and `ls -l` of a
    /// 10,000-file directory, on a local 3-datanode cluster.
    Fuse {
        #[arg(long)]
        dir: PathBuf,
        /// Bytes per transfer, like 1G or 256M.
        #[arg(long, default_value = "1GiB", value_parser = quern_proto::size::parse_size)]
        size: u64,
        /// Files in the listed directory.
        #[arg(long, default_value_t = 10_000)]
        files: usize,
    },
    /// Dataset statistics by map tasks versus pulling every chunk to the
    /// client, on a local 3-datanode cluster with Fashion-MNIST.
    Stats {
        #[arg(long)]
        dir: PathBuf,
        #[arg(
            long,
            default_value = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
        )]
        images: PathBuf,
        #[arg(
            long,
            default_value = "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"
        )]
        labels: PathBuf,
        /// Repetitions; the best time of each is printed.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Distributed training versus one process, with --sync 1 and --sync K,
    /// on a local 3-datanode cluster with Fashion-MNIST.
    Train {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
        fashion: PathBuf,
        /// A Keras model (default: the seed CNN).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        iters: u64,
        #[arg(long, default_value_t = 100)]
        batch_size: u64,
        /// The K compared with exact SGD.
        #[arg(long, default_value_t = 10)]
        sync: u64,
    },
    /// A namenode process under a simulated large cluster: memory per
    /// chunk, heartbeat latency under client load, a report storm and
    /// re-replication, restart-to-writable time, metadata rates.
    Namenode(crate::bench_namenode::BenchNamenode),
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Io {
            dir,
            size,
            files,
            scrape,
        } => crate::bench_io::run(&dir, size, files, scrape).await,
        BenchCommand::Fuse { dir, size, files } => crate::bench_fuse::run(&dir, size, files).await,
        BenchCommand::Stats {
            dir,
            images,
            labels,
            rounds,
        } => crate::bench_stats::run(&dir, &images, &labels, rounds).await,
        BenchCommand::Namenode(a) => crate::bench_namenode::run(a).await,
        BenchCommand::Train {
            dir,
            fashion,
            model,
            iters,
            batch_size,
            sync,
        } => {
            crate::bench_train::run(crate::bench_train::BenchTrain {
                dir: &dir,
                fashion: &fashion,
                model: model.as_deref(),
                iters,
                batch: batch_size,
                sync,
            })
            .await
        }
    }
}
