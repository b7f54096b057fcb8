//! Every layer family against Keras 3, on small functional models made by
//! tests/fixtures/keras/scripts/make_layer_fixtures.py: each layer's
//! inference output, the model's prediction, and the training-mode loss and
//! gradients (NAME.train_grads.npz, trainable weights in Keras order); also
//! the inference-mode gradients (NAME.grads.npz).

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayD;
use quern_compute::nn::{npy, Model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keras/layers")
        .join(name)
}

fn sorted(mut arrays: Vec<(String, ArrayD<f32>)>) -> Vec<ArrayD<f32>> {
    arrays.sort_by_key(|(n, _)| n.trim_start_matches("arr_").parse::<usize>().unwrap_or(0));
    arrays.into_iter().map(|(_, a)| a).collect()
}

fn max_abs(a: &ArrayD<f32>) -> f32 {
    a.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn check_grads(
    family: &str,
    what: &str,
    model: &Model,
    grad: &[f32],
    n: f32,
    want: &[ArrayD<f32>],
) {
    let trainable: Vec<_> = model.param_specs().iter().filter(|s| s.trainable).collect();
    assert_eq!(trainable.len(), want.len(), "{family}: {what} count");
    let global = want.iter().map(max_abs).fold(1e-6f32, f32::max);
    for (spec, w) in trainable.iter().zip(want) {
        let d = grad[spec.offset..spec.offset + spec.len]
            .iter()
            .zip(w.iter())
            .map(|(g, w)| (g / n - w).abs())
            .fold(0.0f32, f32::max);
        let scale = max_abs(w).max(1e-2 * global);
        assert!(
            d <= 1e-4 * scale.max(1e-3),
            "{family} {what} {}: differs from Keras by {d} (max |g| {scale})",
            spec.name
        );
    }
}

fn check(family: &str) {
    let model = Model::load(&fixture(&format!("{family}.json"))).expect("imports");
    let params = model
        .load_params(&fixture(&format!("{family}.weights.npz")))
        .expect("weights");
    let facts: HashMap<String, String> =
        std::fs::read_to_string(fixture(&format!("{family}.params.txt")))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(
        model.param_count().to_string(),
        facts["total_params"],
        "{family}"
    );
    assert_eq!(
        model.trainable_count().to_string(),
        facts["trainable_params"],
        "{family}"
    );
    let x = npy::load_npy(&fixture(&format!("{family}.input.npy"))).unwrap();
    let want = npy::load_npy(&fixture(&format!("{family}.expected.npy"))).unwrap();
    let got = model.predict(&params, x.view()).unwrap();
    let d = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-4, "{family}: predict differs from Keras by {d}");

    let layers: HashMap<String, ArrayD<f32>> =
        npy::load_npz(&fixture(&format!("{family}.layers.npz")))
            .unwrap()
            .into_iter()
            .collect();
    for (name, out) in model.layer_outputs(&params, x.view()).unwrap() {
        let Some(want) = layers.get(&name) else {
            continue;
        };
        if want.shape() != out.shape() {
            // A shared layer's later call, or a nested model's inner layer.
            continue;
        }
        let scale = max_abs(want).max(1.0);
        let d = out
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            d <= 1e-4 * scale,
            "{family}/{name}: differs from Keras by {d}"
        );
    }

    let labels = npy::load_labels(&fixture(&format!("{family}.labels.npy"))).unwrap();
    let n = labels.len() as f32;
    let g = model
        .inference_loss_and_grad_sum(&params, x.view(), &labels)
        .unwrap();
    let want = sorted(npy::load_npz(&fixture(&format!("{family}.grads.npz"))).unwrap());
    check_grads(family, "inference gradient", &model, &g.grad, n, &want);

    let g = model
        .loss_and_grad_sum(&params, x.view(), &labels, None)
        .unwrap();
    let want_loss = *npy::load_npy(&fixture(&format!("{family}.train_loss.npy")))
        .unwrap()
        .iter()
        .next()
        .unwrap() as f64;
    let loss = g.loss_sum / labels.len() as f64;
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{family}: training loss {loss}, Keras {want_loss}"
    );
    let want = sorted(npy::load_npz(&fixture(&format!("{family}.train_grads.npz"))).unwrap());
    check_grads(family, "training gradient", &model, &g.grad, n, &want);
}

#[test]
fn activations() {
    check("activations");
}

#[test]
fn conv1d() {
    check("conv1d");
}

#[test]
fn conv2d() {
    check("conv2d");
}

#[test]
fn frozen() {
    check("frozen");
}

#[test]
fn merge() {
    check("merge");
}

#[test]
fn nested() {
    check("nested");
}

#[test]
fn norm() {
    check("norm");
}

#[test]
fn pooling1d() {
    check("pooling1d");
}

#[test]
fn pooling2d() {
    check("pooling2d");
}

#[test]
fn preprocessing() {
    check("preprocessing");
}

#[test]
fn reshape() {
    check("reshape");
}

#[test]
fn shared() {
    check("shared");
}
