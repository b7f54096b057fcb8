//! Datasets in the filesystem: a directory with `manifest.json` and
//! `part-NNNNN` files of fixed-size records, written so that every chunk
//! holds whole records.

use crate::job::{JobOptions, JobSummary};
use crate::{Client, Error, Result, WriteOptions};
use quern_compute::ops::DatasetStats;
use quern_compute::records::{Encoded, Manifest, PartInfo, MANIFEST};
use quern_proto::msg::FileKind;
use quern_proto::msg::JobKind;

/// Chunk size asked for when importing, before rounding down to whole
/// records: small enough that a 50 MB dataset spreads over many nodes.
pub const DEFAULT_DATASET_CHUNK: u64 = 4 << 20;
/// Largest part file, before rounding down to whole chunks.
pub const DEFAULT_PART_SIZE: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Requested chunk size; rounded down to a whole number of records.
    pub chunk_size: u64,
    pub replication: u8,
    /// Requested part-file size; rounded down to a whole number of chunks.
    pub part_size: u64,
    /// Where the records came from, kept in the manifest.
    pub source: String,
    pub class_names: Option<Vec<String>>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunk_size: DEFAULT_DATASET_CHUNK,
            replication: 3,
            part_size: DEFAULT_PART_SIZE,
            source: String::new(),
            class_names: None,
        }
    }
}

/// A dataset as its manifest describes it.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: String,
    pub manifest: Manifest,
}

impl Dataset {
    pub fn part_paths(&self) -> Vec<String> {
        self.manifest
            .parts
            .iter()
            .map(|p| join(&self.dir, &p.name))
            .collect()
    }

    pub fn manifest_path(&self) -> String {
        join(&self.dir, MANIFEST)
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Client {
    /// Stores decoded records as a new dataset directory. On any failure
    /// the directory is removed again, so nothing half-written is left.
    pub async fn import_dataset(
        &self,
        dir: &str,
        data: &Encoded,
        opts: &ImportOptions,
    ) -> Result<Dataset> {
        quern_proto::RemotePath::parse(dir).map_err(quern_proto::Error::from)?;
        if let Some(s) = self.try_stat(dir).await? {
            let what = if s.kind == FileKind::Dir {
                "directory"
            } else {
                "file"
            };
            return Err(Error::Dataset(format!(
                "{dir}: a {what} with this name exists; remove it (`quern rm -r {dir}`) or pick another name"
            )));
        }
        if let Some(names) = &opts.class_names {
            if names.len() < data.classes as usize {
                return Err(Error::Dataset(format!(
                    "{} class names given but the labels go up to {}",
                    names.len(),
                    data.classes.saturating_sub(1)
                )));
            }
        }
        self.mkdir(dir, true).await?;
        match self.write_dataset(dir, data, opts).await {
            Ok(ds) => Ok(ds),
            Err(e) => {
                if let Err(cleanup) = self.delete(dir, true).await {
                    tracing::warn!("could not remove the half-imported {dir}: {cleanup}");
                }
                Err(e)
            }
        }
    }

    async fn write_dataset(
        &self,
        dir: &str,
        data: &Encoded,
        opts: &ImportOptions,
    ) -> Result<Dataset> {
        let layout = &data.layout;
        let rs = layout.record_size() as u64;
        let chunk_size = layout.chunk_size_for(opts.chunk_size);
        let part_size = (opts.part_size / chunk_size).max(1) * chunk_size;
        let records_per_part = part_size / rs;
        let wopts = WriteOptions {
            replication: opts.replication,
            chunk_size,
            ..WriteOptions::default()
        };
        let mut parts = Vec::new();
        let mut at = 0u64;
        while at < data.records || parts.is_empty() {
            let n = records_per_part.min(data.records - at);
            let name = Manifest::part_name(parts.len());
            let bytes = &data.bytes[(at * rs) as usize..((at + n) * rs) as usize];
            let mut w = self.create(&join(dir, &name), wopts).await?;
            if let Err(e) = w.write(bytes).await {
                w.abort().await;
                return Err(e);
            }
            w.close().await?;
            parts.push(PartInfo { name, records: n });
            at += n;
        }
        let ds = Dataset {
            dir: dir.to_string(),
            manifest: Manifest {
                format: Manifest::FORMAT,
                layout: layout.clone(),
                record_size: layout.record_size(),
                records: data.records,
                classes: data.classes,
                class_names: opts.class_names.clone(),
                chunk_size,
                parts,
                source: opts.source.clone(),
                stats: None,
            },
        };
        self.write_small(
            &ds.manifest_path(),
            &ds.manifest.to_json(),
            opts.replication,
            false,
        )
        .await?;
        Ok(ds)
    }

    /// Writes a small file in one chunk; with `replace`, swaps it in
    /// atomically by writing a temporary name and renaming over.
    pub async fn write_small(
        &self,
        path: &str,
        bytes: &[u8],
        replication: u8,
        replace: bool,
    ) -> Result<()> {
        let tmp = if replace {
            format!("{path}.tmp")
        } else {
            path.to_string()
        };
        let opts = WriteOptions {
            replication,
            chunk_size: (bytes.len() as u64).max(1),
            overwrite: replace,
            ..WriteOptions::default()
        };
        let mut w = self.create(&tmp, opts).await?;
        if let Err(e) = w.write(bytes).await {
            w.abort().await;
            return Err(e);
        }
        w.close().await?;
        if replace {
            self.rename(&tmp, path, true).await?;
        }
        Ok(())
    }

    /// Reads and checks a dataset's manifest.
    pub async fn open_dataset(&self, dir: &str) -> Result<Dataset> {
        let path = join(dir, MANIFEST);
        match self.try_stat(dir).await? {
            None => {
                return Err(Error::Dataset(format!(
                    "{dir}: no such dataset; import one with `quern dataset import`"
                )))
            }
            Some(s) if s.kind != FileKind::Dir => {
                return Err(Error::Dataset(format!(
                    "{dir}: is a file, not a dataset directory"
                )))
            }
            _ => {}
        }
        if self.try_stat(&path).await?.is_none() {
            return Err(Error::Dataset(format!(
                "{dir}: not a dataset (no {MANIFEST}); import one with `quern dataset import`"
            )));
        }
        let bytes = self.read_all(&path).await?;
        let manifest =
            Manifest::from_json(&bytes).map_err(|e| Error::Dataset(format!("{path}: {e}")))?;
        let ds = Dataset {
            dir: dir.to_string(),
            manifest,
        };
        for (part, path) in ds.manifest.parts.iter().zip(ds.part_paths()) {
            let st = self.stat(&path).await?;
            let want = part.records * ds.manifest.record_size as u64;
            if st.size != want {
                return Err(Error::Dataset(format!(
                    "{path}: holds {} bytes but the manifest says {} records of {} bytes",
                    st.size, part.records, ds.manifest.record_size
                )));
            }
            if st.chunk_size % ds.manifest.record_size as u64 != 0 {
                return Err(Error::Dataset(format!(
                    "{path}: chunk size {} splits records of {} bytes; re-import the dataset",
                    st.chunk_size, ds.manifest.record_size
                )));
            }
        }
        Ok(ds)
    }

    /// Computes count, per-feature statistics and the label histogram by
    /// map tasks, and stores them in the manifest.
    pub async fn dataset_stats(
        &self,
        ds: &mut Dataset,
        opts: &JobOptions,
    ) -> Result<(DatasetStats, JobSummary)> {
        let (partial, summary) = self
            .as_job(
                JobKind::Statistics,
                "statistics".into(),
                &ds.dir,
                self.run_map(
                    &ds.part_paths(),
                    &ds.manifest.layout,
                    DatasetStats::operator(),
                    opts,
                ),
                |(_, j)| {
                    format!(
                        "{} tasks ({} node-local) in {} ms",
                        j.tasks, j.node_local, j.wall_ms
                    )
                },
            )
            .await?;
        let stats = DatasetStats::from_partial(partial).map_err(|e| Error::Job(e.to_string()))?;
        if stats.count != ds.manifest.records {
            return Err(Error::Dataset(format!(
                "{}: counted {} records but the manifest says {}",
                ds.dir, stats.count, ds.manifest.records
            )));
        }
        ds.manifest.stats = Some(stats.clone());
        let replication = self.stat(&ds.manifest_path()).await?.replication;
        self.write_small(
            &ds.manifest_path(),
            &ds.manifest.to_json(),
            replication,
            true,
        )
        .await?;
        Ok((stats, summary))
    }

    /// Every record of the dataset, in order (pulled to this client).
    pub async fn read_records(&self, ds: &Dataset) -> Result<Vec<u8>> {
        let mut all =
            Vec::with_capacity((ds.manifest.records * ds.manifest.record_size as u64) as usize);
        for p in ds.part_paths() {
            all.extend_from_slice(&self.read_all(&p).await?);
        }
        Ok(all)
    }
}
