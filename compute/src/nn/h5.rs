//! Keras 3 `model.weights.h5`: the weights inside a `.keras` archive.
//!
//! Keras 3 saves each layer's variables as float32 datasets
//! `layers/<layer name>/vars/<i>`, numbered in the layer's `weights` order
//! (kernel, then bias). A top-level `vars` group and the `optimizer` group
//! are also there; neither is read.

use hdf5_reader::Hdf5File;
use ndarray::ArrayD;

use super::error::{NnError, Result};

/// Reads the weights of `layers` — each a Keras layer name with the number
/// of variables the model expects it to hold — from the bytes of a
/// `model.weights.h5`, in `get_weights()` order. Arrays are labelled by
/// their path in the file. `what` names the file in errors.
pub(crate) fn keras_weights(
    bytes: &[u8],
    layers: &[(&str, usize)],
    what: &str,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let err = |message: String| NnError::Weights(format!("{what}: {message}"));
    let file =
        Hdf5File::from_bytes(bytes).map_err(|e| err(format!("not a readable HDF5 file: {e}")))?;
    let mut arrays = Vec::new();
    for &(layer, count) in layers {
        if count == 0 {
            continue;
        }
        let path = format!("layers/{layer}/vars");
        let group = file.group(&path).map_err(|e| {
            if is_not_found(&e) {
                err(format!(
                    "no weights for layer `{layer}` (no {path}; was the file saved from this model?)"
                ))
            } else {
                err(unreadable(&path, &e))
            }
        })?;
        let (_, names) = group
            .member_names()
            .map_err(|e| err(unreadable(&path, &e)))?;
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
            let array = group
                .dataset(&i.to_string())
                .and_then(|d| d.read_array::<f32>())
                .map_err(|e| err(unreadable(&name, &e)))?;
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
