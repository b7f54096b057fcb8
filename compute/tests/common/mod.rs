//! Helpers the Keras parity tests share: where the fixtures live, loading
//! a model with its weights, and comparing arrays.
#![allow(dead_code)]

use std::path::PathBuf;

use ndarray::ArrayD;
use quern_compute::nn::{Model, Params};
use serde_json::Value;

/// A file under tests/fixtures/keras.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keras")
        .join(name)
}

/// `NAME.json` with the weights of `NAME.weights.npz`.
pub fn load(name: &str) -> (Model, Params) {
    let model = Model::load(&fixture(&format!("{name}.json"))).expect("model loads");
    let params = model
        .load_params(&fixture(&format!("{name}.weights.npz")))
        .expect("weights load");
    (model, params)
}

pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A JSON list of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}
