//! Writing a `.keras` archive that Keras 3's `keras.saving.load_model`
//! opens: `config.json` (the model's own config, with the compile settings
//! it was trained with), `metadata.json`, and `model.weights.h5` with each
//! layer's variables at `layers/<name>/vars/<i>`, as Keras saves them.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::Path;

use serde_json::Value;

use super::error::{NnError, Result};
use super::model::{Model, Params};

/// The Keras version written into `metadata.json`: the format quern writes
/// is the one Keras 3 reads.
const KERAS_VERSION: &str = "3.11.0";

/// A group of the weights file: subgroups and datasets (name, values,
/// shape, whether Keras keeps it as an integer).
#[derive(Default)]
struct Group {
    groups: BTreeMap<String, Group>,
    datasets: Vec<(String, Vec<f32>, Vec<usize>, bool)>,
}

impl Group {
    fn at(&mut self, path: &str) -> &mut Group {
        path.split('/')
            .filter(|s| !s.is_empty())
            .fold(self, |g, seg| g.groups.entry(seg.to_string()).or_default())
    }

    fn fill(&self, g: &mut hdf5_pure::GroupBuilder) {
        for (name, values, shape, int) in &self.datasets {
            let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            let ds = g.create_dataset(name);
            if *int {
                let ints: Vec<i64> = values.iter().map(|v| *v as i64).collect();
                ds.with_i64_data(&ints).with_shape(&shape);
            } else {
                ds.with_f32_data(values).with_shape(&shape);
            }
        }
        for (name, child) in &self.groups {
            let mut sub = g.create_group(name);
            child.fill(&mut sub);
            g.add_group(sub.finish());
        }
    }
}

impl Model {
    /// The bytes of Keras 3's `model.weights.h5` for `params`.
    pub fn keras_weights_h5(&self, params: &Params) -> Result<Vec<u8>> {
        if params.len() != self.param_count() {
            return Err(NnError::Weights(
                "the parameters belong to a different model".into(),
            ));
        }
        let mut root = Group::default();
        for (path, specs) in self.layer_params() {
            let g = root.at(path);
            for (i, s) in specs.iter().enumerate() {
                let values = params.as_slice()[s.offset..s.offset + s.len].to_vec();
                g.datasets
                    .push((i.to_string(), values, s.shape.clone(), s.integer));
            }
        }
        let mut file = hdf5_pure::FileBuilder::new();
        for (name, child) in &root.groups {
            let mut g = file.create_group(name);
            child.fill(&mut g);
            file.add_group(g.finish());
        }
        file.finish()
            .map_err(|e| NnError::Weights(format!("cannot write model.weights.h5: {e}")))
    }

    /// A `.keras` archive of this model with `params`. `compile` replaces
    /// the config's `compile_config` (the loss, optimizer and metrics the
    /// model was trained with), so Keras's `load_model` returns a compiled
    /// model that `fit` can continue.
    pub fn to_keras_bytes(&self, params: &Params, compile: Option<&Value>) -> Result<Vec<u8>> {
        let mut config: Value = serde_json::from_str(self.keras_json())
            .map_err(|e| NnError::Json(format!("the model's own config: {e}")))?;
        if let (Some(c), Some(obj)) = (compile, config.as_object_mut()) {
            obj.insert("compile_config".into(), c.clone());
        }
        let metadata = serde_json::json!({
            "keras_version": KERAS_VERSION,
            "date_saved": unix_date(),
            "saved_by": concat!("quern ", env!("CARGO_PKG_VERSION")),
        });
        let h5 = self.keras_weights_h5(params)?;
        let zerr = |e: zip::result::ZipError| NnError::Zip {
            what: "model.keras".to_string(),
            message: e.to_string(),
        };
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(h5.len() as u64 >= u32::MAX as u64);
        let io = |e: std::io::Error| NnError::Zip {
            what: "model.keras".into(),
            message: e.to_string(),
        };
        for (name, bytes) in [
            ("metadata.json", metadata.to_string().into_bytes()),
            ("config.json", config.to_string().into_bytes()),
            ("model.weights.h5", h5),
        ] {
            w.start_file(name, opts).map_err(zerr)?;
            w.write_all(&bytes).map_err(io)?;
        }
        Ok(w.finish().map_err(zerr)?.into_inner())
    }

    /// Writes [`to_keras_bytes`](Self::to_keras_bytes) to `path`.
    pub fn save_keras(&self, path: &Path, params: &Params, compile: Option<&Value>) -> Result<()> {
        let bytes = self.to_keras_bytes(params, compile)?;
        std::fs::write(path, bytes).map_err(|e| NnError::io(path, e))
    }
}

/// `YYYY-MM-DD@HH:MM:SS` as Keras writes `date_saved`, in UTC.
fn unix_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}@{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
