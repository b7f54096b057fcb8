//! Functional graphs against Keras: resnet_mini (BatchNormalization, a
//! residual Add, two branches joined by Concatenate) in inference and in
//! training mode.

mod common;
use common::{fixture, load, max_abs_diff};

use quern_compute::nn::npy;

fn labels(name: &str) -> Vec<u32> {
    npy::load_labels(&fixture(&format!("{name}.labels.npy"))).unwrap()
}

#[test]
fn resnet_mini_predicts_as_keras_with_moving_statistics() {
    let (model, params) = load("resnet_mini");
    let x = npy::load_npy(&fixture("resnet_mini.input.npy")).unwrap();
    let want = npy::load_npy(&fixture("resnet_mini.expected.npy")).unwrap();
    let got = model.predict(&params, x.view()).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "predict differs from Keras by {d}");

    let layers = npy::load_npz(&fixture("resnet_mini.layers.npz")).unwrap();
    for (name, out) in model.layer_outputs(&params, x.view()).unwrap() {
        let (_, want) = layers
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no Keras output for {name}"));
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&out, want);
        assert!(d <= 1e-4 * scale, "{name}: differs from Keras by {d}");
    }
}

#[test]
fn resnet_mini_training_loss_and_gradients_match_keras() {
    let (model, params) = load("resnet_mini");
    let x = npy::load_npy(&fixture("resnet_mini.input.npy")).unwrap();
    let labels = labels("resnet_mini");
    let want_loss = npy::load_npy(&fixture("resnet_mini.train_loss.npy")).unwrap();
    let want = npy::load_npz(&fixture("resnet_mini.train_grads.npz")).unwrap();
    let g = model
        .loss_and_grad_sum(&params, x.view(), &labels, None)
        .unwrap();
    let n = labels.len() as f64;
    let loss = g.loss_sum / n;
    let wl = *want_loss.iter().next().unwrap() as f64;
    assert!(
        (loss - wl).abs() <= 1e-4 * wl.abs().max(1.0),
        "training loss {loss}, Keras {wl}"
    );
    let trainable: Vec<_> = model.param_specs().iter().filter(|s| s.trainable).collect();
    assert_eq!(
        trainable.len(),
        want.len(),
        "one gradient per trainable weight"
    );
    let mut want = want;
    want.sort_by_key(|(n, _)| n.trim_start_matches("arr_").parse::<usize>().unwrap_or(0));
    for (spec, (_, w)) in trainable.iter().zip(&want) {
        let got: Vec<f32> = g.grad[spec.offset..spec.offset + spec.len]
            .iter()
            .map(|v| *v / n as f32)
            .collect();
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let d = got
            .iter()
            .zip(w.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            d <= 1e-4 * scale.max(1e-2),
            "{}: gradient differs from Keras by {d} (max |g| {scale})",
            spec.name
        );
    }
    // Two BatchNormalization calls report their batch statistics.
    assert_eq!(g.stats.len(), 2);
}

#[test]
fn resnet_mini_summary_counts_and_connections_match_keras() {
    let (model, _) = load("resnet_mini");
    let s = model.summary();
    for part in [
        "Connected to",
        "add (Add)",
        "activation[0][0], batch_normalization_1[0][0]",
        "conv2d_3[0][0], conv2d_4[0][0]",
        "Total params: 6,378 (24.91 KB)",
        "Trainable params: 6,314 (24.66 KB)",
        "Non-trainable params: 64 (256.00 B)",
    ] {
        assert!(s.contains(part), "{part} missing from:\n{s}");
    }
}

#[test]
fn moving_statistics_follow_keras_momentum() {
    let (model, params) = load("resnet_mini");
    let x = npy::load_npy(&fixture("resnet_mini.input.npy")).unwrap();
    let labels = labels("resnet_mini");
    let g = model
        .loss_and_grad_sum(&params, x.view(), &labels, None)
        .unwrap();
    let mut p = params.as_slice().to_vec();
    model.update_moving_stats(&mut p, &g.stats).unwrap();
    let spec = |name: &str| {
        model
            .param_specs()
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .clone()
    };
    let mm = spec("batch_normalization/moving_mean");
    let s = &g.stats[0];
    for j in 0..mm.len {
        let mean = (s.sum[j] / s.count as f64) as f32;
        let before = params.as_slice()[mm.offset + j];
        let want = before * 0.99 + mean * (1.0 - 0.99);
        assert!((p[mm.offset + j] - want).abs() < 1e-6);
    }
    // Trainable weights are not touched by the statistics update.
    let k = spec("conv2d/kernel");
    assert_eq!(
        &p[k.offset..k.offset + k.len],
        &params.as_slice()[k.offset..k.offset + k.len]
    );
}
