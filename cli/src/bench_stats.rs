//! `quern bench stats`: dataset statistics by map tasks on the datanodes
//! against the same statistics computed by pulling every chunk to the
//! client, on one local 3-datanode cluster in one run.

use crate::cluster::{self, UpArgs};
use anyhow::{ensure, Context, Result};
use quern_client::{Client, ImportOptions, JobOptions};
use quern_compute::import::parse_idx;
use quern_proto::config::ClientConfig;
use quern_proto::size::format_size;
use std::path::Path;

pub async fn run(dir: &Path, images: &Path, labels: &Path, rounds: usize) -> Result<()> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("{}", p.display()));
    let data = parse_idx(
        &images.display().to_string(),
        &read(images)?,
        &labels.display().to_string(),
        &read(labels)?,
    )?;
    eprintln!("starting a 3-datanode cluster in {}", dir.display());
    let c = cluster::up(UpArgs::local(dir, 3)).await?;
    let result = measure(&c, &data, rounds).await;
    cluster::down(&c.dir)?;
    result
}

async fn measure(
    c: &cluster::ClusterFile,
    data: &quern_compute::records::Encoded,
    rounds: usize,
) -> Result<()> {
    let client = Client::from_config(&ClientConfig::load(&c.dir.join("client.toml"))?)?;
    let _ = client.delete("/bench-stats", true).await;
    let mut ds = client
        .import_dataset("/bench-stats", data, &ImportOptions::default())
        .await?;
    let bytes = data.records * ds.manifest.record_size as u64;
    println!(
        "quern bench stats: {} records x {} bytes = {}, {} chunks of {}, replication 3, 3 datanodes",
        data.records,
        ds.manifest.record_size,
        format_size(bytes),
        bytes.div_ceil(ds.manifest.chunk_size),
        format_size(ds.manifest.chunk_size)
    );
    let (mut best_map, mut best_pull) = (f64::MAX, f64::MAX);
    let (mut map_net, mut pull_net, mut local_share) = (0, 0, 0.0);
    for _ in 0..rounds.max(1) {
        let (stats, s) = client
            .dataset_stats(&mut ds, &JobOptions::default())
            .await?;
        best_map = best_map.min(s.wall_ms as f64 / 1000.0);
        map_net = s.network_bytes;
        local_share = s.node_local_share();
        let (pulled, p) = crate::dataset::pull_stats(&client, &ds).await?;
        ensure!(
            pulled == stats,
            "pulled statistics differ from the map tasks'"
        );
        best_pull = best_pull.min(p.wall_ms as f64 / 1000.0);
        pull_net = p.network_bytes;
    }
    println!(
        "map tasks: {:>7.3} s  {:>10} over the network ({:.3}% of the dataset), node-local {:.0}%",
        best_map,
        format_size(map_net),
        map_net as f64 / bytes as f64 * 100.0,
        local_share * 100.0
    );
    println!(
        "pull:      {:>7.3} s  {:>10} over the network ({:.0}% of the dataset)",
        best_pull,
        format_size(pull_net),
        pull_net as f64 / bytes as f64 * 100.0
    );
    println!(
        "ratio: map time / pull time = {:.2} (target <= 1); network map / pull = {:.4} (target < 0.01)",
        best_map / best_pull,
        map_net as f64 / pull_net as f64
    );
    Ok(())
}
