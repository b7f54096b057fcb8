//! Keras 3 `model.weights.h5`: the weights inside a `.keras` archive.
//!
//! Keras 3 saves each layer's variables as float32 datasets
//! `layers/<layer name>/vars/<i>`, numbered in the layer's `weights` order
//! (kernel, then bias). A top-level `vars` group and the `optimizer` group
//! are also there; neither is read.

use hdf5_reader::Hdf5File;
use ndarray::ArrayD;

use super::error::{NnError, Result};

/// Reads the weights of `layers` — each a Keras layer name, the path of its
/// `vars` group, and the number of variables the model expects it to hold —
/// from the bytes of a
/// `model.weights.h5`, in `get_weights()` order. Arrays are labelled by
/// their path in the file. `what` names the file in errors. The arrays
/// together may take at most `limit` bytes as float32 (`why` says where the
/// limit comes from): HDF5 datasets can be compressed, so a file within its
/// own size limit could still decode to gigabytes.
pub(crate) fn keras_weights(
    bytes: &[u8],
    layers: &[(&str, &str, usize)],
    what: &str,
    limit: u64,
    why: &str,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let err = |message: String| NnError::Weights(format!("{what}: {message}"));
    let file =
        Hdf5File::from_bytes(bytes).map_err(|e| err(format!("not a readable HDF5 file: {e}")))?;
    let mut arrays = Vec::new();
    let mut decoded = 0u64;
    for &(layer, path, count) in layers {
        if count == 0 {
            continue;
        }
        let group = file.group(path).map_err(|e| {
            if is_not_found(&e) {
                err(format!(
                    "no weights for layer `{layer}` (no {path}; was the file saved from this model?)"
                ))
            } else {
                err(unreadable(path, &e))
            }
        })?;
        let (_, names) = group
            .member_names()
            .map_err(|e| err(unreadable(path, &e)))?;
        let mut indices: Vec<usize> = names.iter().filter_map(|n| n.parse().ok()).collect();
        indices.sort_unstable();
        if indices != (0..count).collect::<Vec<_>>() {
            return Err(err(format!(
                "{path}: layer `{layer}` needs {count} variables (0..{count}), the file has [{}]",
                names.join(", ")
            )));
        }
        for i in indices {
            let name = format!("{path}/{i}");
            let dataset = group
                .dataset(&i.to_string())
                .map_err(|e| err(unreadable(&name, &e)))?;
            // Checked from the shape the file declares, before decoding.
            let bytes = dataset
                .shape()
                .iter()
                .try_fold(4u64, |a, &d| a.checked_mul(d))
                .unwrap_or(u64::MAX);
            decoded = decoded.saturating_add(bytes);
            if decoded > limit {
                return Err(NnError::TooLarge {
                    what: what.to_string(),
                    entry: name,
                    size: format!(
                        "has shape {:?}, bringing the arrays to {decoded} bytes",
                        dataset.shape()
                    ),
                    limit,
                    why: why.to_string(),
                });
            }
            // Normalization's `count` is an int64 scalar; every other
            // variable is float32.
            let array = match dataset.read_array::<f32>() {
                Ok(a) => a,
                Err(e) => match dataset.read_array::<i64>() {
                    Ok(a) => a.mapv(|v| v as f32),
                    Err(_) => return Err(err(unreadable(&name, &e))),
                },
            };
            arrays.push((name, array));
        }
    }
    Ok(arrays)
}

fn is_not_found(e: &hdf5_reader::error::Error) -> bool {
    use hdf5_reader::error::Error;
    match e {
        Error::GroupNotFound(_) | Error::DatasetNotFound(_) => true,
        Error::Context { source, .. } => is_not_found(source),
        _ => false,
    }
}

fn unreadable(path: &str, e: &hdf5_reader::error::Error) -> String {
    format!("{path}: cannot read it (corrupt or truncated file?): {e}")
}
