//! `quern bench io`: figures for storage throughput and their ceilings.

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
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Io { dir, size, files } => crate::bench_io::run(&dir, size, files).await,
    }
}
