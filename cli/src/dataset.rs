//! `quern dataset`: import, inspect, compute statistics of and export
//! datasets of fixed-size records.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use quern_client::{Client, Dataset, ImportOptions, JobOptions, JobSummary};
use quern_compute::import::{parse_csv, parse_idx, LabelColumn};
use quern_compute::ops::DatasetStats;
use quern_compute::records::Encoded;
use quern_proto::size::{format_size, parse_size};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Import local files as a new dataset directory.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Show a dataset's manifest, parts and chunks with their record ranges.
    Info {
        dir: String,
        #[arg(long)]
        json: bool,
    },
    /// Count, per-feature min/max/mean/std and label histogram, computed by
    /// map tasks on the datanodes; stored in the manifest.
    Stats {
        dir: String,
        #[arg(long)]
        json: bool,
        /// Pull every chunk to this client and compute here instead (the
        /// baseline map tasks are measured against); stores nothing.
        #[arg(long)]
        pull: bool,
    },
    /// Write the dataset to a local file (`x` and `y` arrays).
    Export {
        dir: String,
        #[arg(long, value_parser = ["npz"], default_value = "npz")]
        format: String,
        out: PathBuf,
        /// Replace an existing local file.
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Chunk size to aim for; rounded down to a whole number of records.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Copies of each chunk.
    #[arg(short, long, default_value_t = 3)]
    replication: u8,
    /// Part file size to aim for; rounded down to a whole number of chunks.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    part_size: u64,
    /// Class names in label order, comma-separated.
    #[arg(long, value_delimiter = ',')]
    class_names: Option<Vec<String>>,
}

#[derive(Subcommand)]
pub enum ImportCommand {
    /// MNIST-style IDX files, gzipped or not.
    Idx {
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        labels: PathBuf,
        dir: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Numeric CSV: float features and one label column (an integer class
    /// index, or a float target with --regression).
    Csv {
        file: PathBuf,
        dir: String,
        /// The label column, by name (needs --header) or 0-based index.
        #[arg(long)]
        label_column: LabelColumn,
        /// The first line names the columns.
        #[arg(long)]
        header: bool,
        /// The label column holds float targets (regression; train with
        /// --loss mean_squared_error or another regression loss), stored
        /// as float32.
        #[arg(long)]
        regression: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn read_local(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}", path.display()))
}

pub async fn run(cmd: DatasetCommand, config: Option<&Path>) -> Result<i32> {
    // Parse local input before connecting: a bad file stores nothing.
    let import = match &cmd {
        DatasetCommand::Import(ImportCommand::Idx {
            images,
            labels,
            dir,
            store,
        }) => {
            let data = parse_idx(
                &images.display().to_string(),
                &read_local(images)?,
                &labels.display().to_string(),
                &read_local(labels)?,
            )?;
            let source = format!("idx: {} + {}", images.display(), labels.display());
            Some((dir.clone(), data, store.clone(), source))
        }
        DatasetCommand::Import(ImportCommand::Csv {
            file,
            dir,
            label_column,
            header,
            regression,
            store,
        }) => {
            let data = parse_csv(
                &file.display().to_string(),
                &read_local(file)?,
                label_column,
                *header,
                *regression,
            )?;
            Some((
                dir.clone(),
                data,
                store.clone(),
                format!("csv: {}", file.display()),
            ))
        }
        _ => None,
    };
    if let DatasetCommand::Export { out, force, .. } = &cmd {
        if out.exists() && !force {
            bail!("{}: exists; pass --force to replace it", out.display());
        }
    }
    let cfg = crate::client_config(config)?;
    let client = Client::from_config(&cfg)?;
    if let Some((dir, data, store, source)) = import {
        return import_dataset(&client, &dir, data, store, source).await;
    }
    match cmd {
        DatasetCommand::Import(_) => unreachable!("handled above"),
        DatasetCommand::Info { dir, json } => info(&client, &dir, json).await,
        DatasetCommand::Stats { dir, json, pull } => stats(&client, &dir, json, pull).await,
        DatasetCommand::Export { dir, out, .. } => export(&client, &dir, &out).await,
    }
}

async fn import_dataset(
    client: &Client,
    dir: &str,
    data: Encoded,
    store: StoreArgs,
    source: String,
) -> Result<i32> {
    let opts = ImportOptions {
        chunk_size: store.chunk_size,
        replication: store.replication,
        part_size: store.part_size,
        source,
        class_names: store.class_names,
    };
    let ds = client.import_dataset(dir, &data, &opts).await?;
    let m = &ds.manifest;
    let labels = if m.layout.classified() {
        format!("{} classes", m.classes)
    } else {
        "float targets".to_string()
    };
    println!(
        "imported {} records of {:?} {} + {} label ({} bytes each, {labels}) into {} ({} part{}, {} chunks of {})",
        m.records,
        m.layout.feature_shape,
        m.layout.feature_dtype.name(),
        m.layout.label_dtype.name(),
        m.record_size,
        ds.dir,
        m.parts.len(),
        if m.parts.len() == 1 { "" } else { "s" },
        (m.records * m.record_size as u64).div_ceil(m.chunk_size),
        format_size(m.chunk_size),
    );
    Ok(0)
}

#[derive(serde::Serialize)]
struct ChunkRange {
    part: String,
    index: u32,
    first_record: u64,
    records: u64,
    bytes: u64,
    digest: String,
    holders: Vec<String>,
}

async fn info(client: &Client, dir: &str, json: bool) -> Result<i32> {
    let ds = client.open_dataset(dir).await?;
    let m = &ds.manifest;
    let rs = m.record_size as u64;
    let mut chunks = Vec::new();
    let mut first = 0u64;
    for (part, path) in m.parts.iter().zip(ds.part_paths()) {
        let loc = client.locate(&path).await?;
        for c in loc.chunks {
            let records = c.meta.size / rs;
            chunks.push(ChunkRange {
                part: part.name.clone(),
                index: c.index,
                first_record: first,
                records,
                bytes: c.meta.size,
                digest: c.meta.digest.to_string(),
                holders: c
                    .replicas
                    .iter()
                    .map(|r| format!("{}{}", r.node.addr, state_suffix(r.state)))
                    .collect(),
            });
            first += records;
        }
    }
    if json {
        let doc = serde_json::json!({
            "dir": ds.dir,
            "manifest": m,
            "chunks": chunks,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    println!("dataset   {}", ds.dir);
    println!("records   {}", m.records);
    println!(
        "record    features {:?} {}, label {} ({} bytes)",
        m.layout.feature_shape,
        m.layout.feature_dtype.name(),
        m.layout.label_dtype.name(),
        m.record_size
    );
    match &m.class_names {
        _ if !m.layout.classified() => println!("targets   float32 (regression)"),
        Some(n) => println!("classes   {} ({})", m.classes, n.join(", ")),
        None => println!("classes   {}", m.classes),
    }
    println!(
        "chunk     {} ({} records)",
        format_size(m.chunk_size),
        m.chunk_size / rs
    );
    if !m.source.is_empty() {
        println!("source    {}", m.source);
    }
    println!(
        "stats     {}",
        if m.stats.is_some() {
            "computed (see --json or `quern dataset stats`)"
        } else {
            "not computed (run `quern dataset stats`)"
        }
    );
    println!();
    println!(
        "{:<12} {:>5} {:>10} {:>8} {:>10}  holders",
        "part", "chunk", "records", "count", "bytes"
    );
    for c in &chunks {
        println!(
            "{:<12} {:>5} {:>10} {:>8} {:>10}  {}",
            c.part,
            c.index,
            format!("{}..", c.first_record),
            c.records,
            c.bytes,
            c.holders.join(" ")
        );
    }
    Ok(0)
}

fn state_suffix(s: quern_proto::msg::ReplicaState) -> &'static str {
    match s {
        quern_proto::msg::ReplicaState::Live => "",
        quern_proto::msg::ReplicaState::Dead => " (dead)",
        quern_proto::msg::ReplicaState::Corrupt => " (corrupt)",
    }
}

/// Prints a job summary the same way for every job.
pub fn print_summary(what: &str, s: &JobSummary) {
    eprintln!(
        "{what}: {} tasks, {} attempts, {:.0}% node-local ({} remote), {} read from local disks, {} over the network, {:.2} s",
        s.tasks,
        s.attempts,
        s.node_local_share() * 100.0,
        s.remote,
        format_size(s.local_bytes_read),
        format_size(s.network_bytes),
        s.wall_ms as f64 / 1000.0
    );
    for r in &s.retries {
        eprintln!(
            "  retried {} chunk {} after {} failed: {}",
            r.file, r.chunk_index, r.node, r.error
        );
    }
}

async fn stats(client: &Client, dir: &str, json: bool, pull: bool) -> Result<i32> {
    let mut ds = client.open_dataset(dir).await?;
    let (stats, summary) = if pull {
        pull_stats(client, &ds).await?
    } else {
        client
            .dataset_stats(&mut ds, &JobOptions::default())
            .await?
    };
    if json {
        let doc = serde_json::json!({ "stats": stats, "job": summary });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    print_stats(&ds, &stats);
    print_summary(if pull { "pull" } else { "job" }, &summary);
    Ok(0)
}

/// The baseline: every chunk comes to this client and the same operator
/// runs here, one chunk at a time.
pub async fn pull_stats(client: &Client, ds: &Dataset) -> Result<(DatasetStats, JobSummary)> {
    let start = Instant::now();
    let op = DatasetStats::operator();
    let bytes = client.read_records(ds).await?;
    let rs = ds.manifest.record_size;
    let per_chunk = ds.manifest.chunk_size as usize;
    let mut partials = Vec::new();
    for chunk in bytes.chunks(per_chunk.max(rs)) {
        let view = ds.manifest.layout.view("pulled chunk", chunk)?;
        partials.push(op.map(&view)?);
    }
    let stats = if partials.is_empty() {
        DatasetStats::from_partial(op.map(&ds.manifest.layout.view("empty", &[])?)?)?
    } else {
        DatasetStats::from_partial(op.fold(partials)?)?
    };
    let summary = JobSummary {
        tasks: 0,
        network_bytes: bytes.len() as u64,
        wall_ms: start.elapsed().as_millis() as u64,
        ..JobSummary::default()
    };
    Ok((stats, summary))
}

fn print_stats(ds: &Dataset, s: &DatasetStats) {
    println!("records   {}", s.count);
    let overall = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().copied().fold(init, f);
    let mins: Vec<f64> = s.min.iter().map(|&x| f64::from(x)).collect();
    let maxs: Vec<f64> = s.max.iter().map(|&x| f64::from(x)).collect();
    let n = s.mean.len().max(1) as f64;
    println!(
        "features  {} (min {}, max {}, mean of means {:.4}, mean std {:.4})",
        s.mean.len(),
        overall(&mins, f64::min, f64::INFINITY),
        overall(&maxs, f64::max, f64::NEG_INFINITY),
        s.mean.iter().sum::<f64>() / n,
        s.std.iter().sum::<f64>() / n
    );
    if s.mean.len() <= 32 {
        println!(
            "{:>8} {:>12} {:>12} {:>12} {:>12}",
            "feature", "min", "max", "mean", "std"
        );
        for j in 0..s.mean.len() {
            println!(
                "{:>8} {:>12} {:>12} {:>12.6} {:>12.6}",
                j, s.min[j], s.max[j], s.mean[j], s.std[j]
            );
        }
    } else {
        println!("          (per-feature values: --json, or the manifest)");
    }
    if !ds.manifest.layout.classified() {
        return;
    }
    println!("labels");
    for (label, count) in s.label_counts.iter().enumerate() {
        let name = ds
            .manifest
            .class_names
            .as_ref()
            .and_then(|n| n.get(label))
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        println!("{label:>8}{name:<14} {count:>10}");
    }
}

async fn export(client: &Client, dir: &str, out: &Path) -> Result<i32> {
    let ds = client.open_dataset(dir).await?;
    let bytes = client.read_records(&ds).await?;
    let npz = quern_compute::records::to_npz(&ds.manifest.layout, &bytes)?;
    let tmp = out.with_extension("npz.part");
    std::fs::write(&tmp, &npz).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    println!(
        "wrote {} records to {} ({})",
        ds.manifest.records,
        out.display(),
        format_size(npz.len() as u64)
    );
    Ok(0)
}
