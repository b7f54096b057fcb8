//! Fixed-size records: the layout every dataset part file uses, and the
//! manifest that describes a dataset.
//!
//! A record is its features (row-major, channels_last, little-endian)
//! followed by its label. Records never straddle chunks because a dataset's
//! chunk size is a whole multiple of the record size.

use crate::ops::DatasetStats;
use serde::{Deserialize, Serialize};

/// Name of the manifest inside a dataset directory.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{what}: {len} bytes is not a whole number of {record_size}-byte records")]
    Ragged {
        what: String,
        len: usize,
        record_size: usize,
    },
    #[error("{0}")]
    Layout(String),
    #[error("manifest: {0}")]
    Manifest(String),
}

/// Element type of features or labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    U8,
    U32,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::U32 | DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::F32 => "float32",
        }
    }
}

/// How one record is laid out in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordLayout {
    /// Shape of one example's features (e.g. `[28, 28, 1]`).
    pub feature_shape: Vec<usize>,
    pub feature_dtype: DType,
    pub label_dtype: DType,
}

impl RecordLayout {
    pub fn new(
        feature_shape: Vec<usize>,
        feature_dtype: DType,
        label_dtype: DType,
    ) -> Result<RecordLayout, RecordError> {
        if feature_shape.is_empty() || feature_shape.contains(&0) {
            return Err(RecordError::Layout(format!(
                "feature shape {feature_shape:?} must have at least one dimension and no zero"
            )));
        }
        Ok(RecordLayout {
            feature_shape,
            feature_dtype,
            label_dtype,
        })
    }

    /// Whether labels are class indices (uint8, uint32); float32 labels
    /// are regression targets.
    pub fn classified(&self) -> bool {
        self.label_dtype != DType::F32
    }

    /// Number of feature values in one record.
    pub fn features(&self) -> usize {
        self.feature_shape.iter().product()
    }

    pub fn feature_bytes(&self) -> usize {
        self.features() * self.feature_dtype.size()
    }

    pub fn record_size(&self) -> usize {
        self.feature_bytes() + self.label_dtype.size()
    }

    /// The largest whole multiple of the record size not above `requested`
    /// (at least one record), so that chunks hold whole records.
    pub fn chunk_size_for(&self, requested: u64) -> u64 {
        let r = self.record_size() as u64;
        (requested / r).max(1) * r
    }

    /// A view of `bytes` as records; refuses a partial record.
    pub fn view<'a>(&'a self, what: &str, bytes: &'a [u8]) -> Result<Records<'a>, RecordError> {
        let rs = self.record_size();
        if !bytes.len().is_multiple_of(rs) {
            return Err(RecordError::Ragged {
                what: what.into(),
                len: bytes.len(),
                record_size: rs,
            });
        }
        Ok(Records {
            layout: self,
            bytes,
        })
    }
}

/// Whole records over a byte slice (one chunk, usually).
#[derive(Clone, Copy)]
pub struct Records<'a> {
    layout: &'a RecordLayout,
    bytes: &'a [u8],
}

impl<'a> Records<'a> {
    pub fn len(&self) -> usize {
        self.bytes.len() / self.layout.record_size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn layout(&self) -> &RecordLayout {
        self.layout
    }

    fn record(&self, i: usize) -> &'a [u8] {
        let rs = self.layout.record_size();
        &self.bytes[i * rs..(i + 1) * rs]
    }

    /// Decodes record `i`'s features into `out` (length = features()).
    pub fn features_into(&self, i: usize, out: &mut [f32]) {
        let raw = &self.record(i)[..self.layout.feature_bytes()];
        match self.layout.feature_dtype {
            DType::U8 => {
                for (o, &b) in out.iter_mut().zip(raw) {
                    *o = f32::from(b);
                }
            }
            DType::F32 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            DType::U32 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32;
                }
            }
        }
    }

    /// Record `i`'s class index (in a layout with float targets, the
    /// target truncated: see [`target`](Self::target)).
    pub fn label(&self, i: usize) -> u32 {
        let raw = &self.record(i)[self.layout.feature_bytes()..];
        match self.layout.label_dtype {
            DType::U8 => u32::from(raw[0]),
            DType::U32 => u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            DType::F32 => f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as u32,
        }
    }

    /// Record `i`'s label as a value: the float target, or the class index.
    pub fn target(&self, i: usize) -> f32 {
        let raw = &self.record(i)[self.layout.feature_bytes()..];
        match self.layout.label_dtype {
            DType::F32 => f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            _ => self.label(i) as f32,
        }
    }
}

/// Appends one record to `out` in the layout's encoding. `label` is a
/// class index, or the target itself when labels are float32.
pub fn encode_record(layout: &RecordLayout, features: &[f32], label: f64, out: &mut Vec<u8>) {
    match layout.feature_dtype {
        DType::U8 => out.extend(features.iter().map(|&f| f as u8)),
        DType::F32 => {
            for f in features {
                out.extend_from_slice(&f.to_le_bytes());
            }
        }
        DType::U32 => {
            for &f in features {
                out.extend_from_slice(&(f as u32).to_le_bytes());
            }
        }
    }
    match layout.label_dtype {
        DType::U8 => out.push(label as u8),
        DType::U32 => out.extend_from_slice(&(label as u32).to_le_bytes()),
        DType::F32 => out.extend_from_slice(&(label as f32).to_le_bytes()),
    }
}

/// One `part-NNNNN` file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub name: String,
    pub records: u64,
}

/// `manifest.json`: what a dataset holds and how its records are laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    #[serde(flatten)]
    pub layout: RecordLayout,
    pub record_size: usize,
    pub records: u64,
    pub classes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    pub chunk_size: u64,
    pub parts: Vec<PartInfo>,
    /// Where the records came from (for people reading the manifest).
    #[serde(default)]
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<DatasetStats>,
}

impl Manifest {
    pub const FORMAT: u32 = 1;

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and checks a manifest: the layout, the record size and the
    /// part record counts must agree, or a task could split records.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, RecordError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Manifest(e.to_string()))?;
        if m.format != Manifest::FORMAT {
            return Err(RecordError::Manifest(format!(
                "format {} is not supported (this quern reads format {})",
                m.format,
                Manifest::FORMAT
            )));
        }
        let layout = RecordLayout::new(
            m.layout.feature_shape.clone(),
            m.layout.feature_dtype,
            m.layout.label_dtype,
        )?;
        if layout.record_size() != m.record_size {
            return Err(RecordError::Manifest(format!(
                "record_size {} disagrees with the layout ({} bytes)",
                m.record_size,
                layout.record_size()
            )));
        }
        if m.chunk_size == 0 || !m.chunk_size.is_multiple_of(m.record_size as u64) {
            return Err(RecordError::Manifest(format!(
                "chunk_size {} is not a whole multiple of the {}-byte record",
                m.chunk_size, m.record_size
            )));
        }
        let total: u64 = m.parts.iter().map(|p| p.records).sum();
        if total != m.records {
            return Err(RecordError::Manifest(format!(
                "parts hold {total} records but the manifest says {}",
                m.records
            )));
        }
        Ok(m)
    }

    /// The name of part `i`.
    pub fn part_name(i: usize) -> String {
        format!("part-{i:05}")
    }
}

/// Records decoded from an importer, ready to be cut into parts.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub layout: RecordLayout,
    pub records: u64,
    pub classes: u32,
    /// Every record, back to back.
    pub bytes: Vec<u8>,
}

fn npy_descr(d: DType) -> &'static str {
    match d {
        DType::U8 => "|u1",
        DType::U32 => "<u4",
        DType::F32 => "<f4",
    }
}

/// The records as an `.npz` with `x` (records x feature shape, in the
/// stored dtype) and `y` (labels), as `np.savez` would write them.
pub fn to_npz(layout: &RecordLayout, bytes: &[u8]) -> Result<Vec<u8>, RecordError> {
    use std::io::Write;
    let records = layout.view("dataset", bytes)?;
    let n = records.len();
    let fb = layout.feature_bytes();
    let lb = layout.label_dtype.size();
    let mut x = Vec::with_capacity(n * fb);
    let mut y = Vec::with_capacity(n * lb);
    for rec in bytes.chunks_exact(layout.record_size()) {
        x.extend_from_slice(&rec[..fb]);
        y.extend_from_slice(&rec[fb..]);
    }
    let mut shape = vec![n];
    shape.extend_from_slice(&layout.feature_shape);
    let zerr = |e: zip::result::ZipError| RecordError::Layout(format!("writing npz: {e}"));
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(x.len() > (1 << 31));
    for (name, descr, shape, data) in [
        ("x.npy", npy_descr(layout.feature_dtype), shape, x),
        ("y.npy", npy_descr(layout.label_dtype), vec![n], y),
    ] {
        w.start_file(name, opts).map_err(zerr)?;
        w.write_all(&crate::nn::npy::npy_bytes(descr, &shape, &data))
            .map_err(|e| RecordError::Layout(format!("writing npz: {e}")))?;
    }
    Ok(w.finish().map_err(zerr)?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_hold_whole_records() {
        for (shape, dt, req) in [
            (vec![28, 28, 1], DType::U8, 4u64 << 20),
            (vec![3], DType::F32, 1000),
            (vec![7, 5], DType::F32, 1),
            (vec![10], DType::U8, 64 << 20),
        ] {
            let l = RecordLayout::new(shape, dt, DType::U32).unwrap();
            let c = l.chunk_size_for(req);
            assert_eq!(c % l.record_size() as u64, 0);
            assert!(c <= req.max(l.record_size() as u64));
            assert!(c + l.record_size() as u64 > req);
        }
    }

    #[test]
    fn records_round_trip() {
        let l = RecordLayout::new(vec![2], DType::F32, DType::U8).unwrap();
        let mut b = Vec::new();
        encode_record(&l, &[1.5, -2.0], 3.0, &mut b);
        encode_record(&l, &[0.25, 8.0], 9.0, &mut b);
        let r = l.view("test", &b).unwrap();
        assert_eq!(r.len(), 2);
        let mut f = [0f32; 2];
        r.features_into(1, &mut f);
        assert_eq!(f, [0.25, 8.0]);
        assert_eq!(r.label(0), 3);
        assert!(l.view("short", &b[..b.len() - 1]).is_err());

        let reg = RecordLayout::new(vec![1], DType::F32, DType::F32).unwrap();
        assert!(!reg.classified());
        let mut b = Vec::new();
        encode_record(&reg, &[2.0], -0.375, &mut b);
        assert_eq!(reg.view("t", &b).unwrap().target(0), -0.375);
    }
}
