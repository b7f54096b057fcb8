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
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Io { dir, size, files } => crate::bench_io::run(&dir, size, files).await,
        BenchCommand::Stats {
            dir,
            images,
            labels,
            rounds,
        } => crate::bench_stats::run(&dir, &images, &labels, rounds).await,
    }
}
