//! The nine `keras.applications` architectures against Keras 3: import with
//! Keras's parameter counts, inference outputs, and training-mode loss and
//! gradients. Weights are regenerated from the rule in
//! tests/fixtures/keras/scripts/kfix.py (so big models need no weight
//! files); BatchNormalization's calibrated moving statistics come from
//! NAME.moving_stats.npz.

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayD;
use quern_compute::nn::{npy, Model, Params};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keras/apps")
        .join(name)
}

/// NAME.params.txt as key -> value.
fn facts(app: &str) -> HashMap<String, String> {
    std::fs::read_to_string(fixture(&format!("{app}.params.txt")))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// `c + s * (2u - 1)` in f32 over splitmix64 draws, as kfix.py documents.
fn centered(seed: u64, n: usize, c: f32, s: f32) -> Vec<f32> {
    (1..=n as u64)
        .map(|j| {
            let mut z = seed.wrapping_add(j.wrapping_mul(GAMMA));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
            c + s * (2.0 * u - 1.0)
        })
        .collect()
}

/// kfix.py's `init_rule`: (c, s) by layer class and variable name.
fn rule(class: &str, var: &str, shape: &[usize]) -> Option<(f32, f32)> {
    if var == "count" {
        return None;
    }
    if class == "LayerScale"
        || var == "gamma"
        || var == "moving_variance"
        || (class == "Normalization" && var == "variance")
    {
        return Some((1.0, 0.5));
    }
    if class == "PReLU" {
        return Some((0.25, 0.1));
    }
    if shape.len() <= 1 {
        return Some((0.0, 0.1));
    }
    let prod = |s: &[usize]| s.iter().product::<usize>();
    let fan_in = if (class == "DepthwiseConv2D" && var == "kernel") || var == "depthwise_kernel" {
        prod(&shape[..shape.len() - 2])
    } else if class == "Conv2DTranspose" && var == "kernel" {
        prod(&shape[..shape.len() - 2]) * shape[shape.len() - 1]
    } else {
        prod(&shape[..shape.len() - 1])
    };
    Some((0.0, (6.0 / fan_in as f64).sqrt() as f32))
}

fn weights(model: &Model, app: &str, seed: u64) -> Params {
    let classes: HashMap<&str, &str> = model.layer_names().into_iter().collect();
    let calibrated: HashMap<usize, ArrayD<f32>> =
        npy::load_npz(&fixture(&format!("{app}.moving_stats.npz")))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("arr_").parse().unwrap(), v))
            .collect();
    let mut values = Vec::with_capacity(model.param_count());
    for (i, spec) in model.param_specs().iter().enumerate() {
        let (layer, var) = spec.name.rsplit_once('/').unwrap();
        if let Some(a) = calibrated.get(&i) {
            assert_eq!(a.len(), spec.len, "{}", spec.name);
            values.extend(a.iter().copied());
            continue;
        }
        match rule(classes[layer], var, &spec.shape) {
            Some((c, s)) => values.extend(centered(seed * 65536 + i as u64, spec.len, c, s)),
            None => values.extend(std::iter::repeat_n(0.0, spec.len)),
        }
    }
    model.params_from_flat(values).unwrap()
}

/// Compares a gradient with Keras's digest of it: its L2 norm and 16
/// sampled values, within `tol` of the largest gradient of the model (the
/// measure the fixture reports for Keras against itself).
fn check_digest(
    app: &str,
    name: &str,
    got: &[f32],
    digest: &HashMap<String, ArrayD<f32>>,
    i: usize,
    tol: f64,
) {
    let global = digest["max_abs"]
        .iter()
        .fold(0.0f64, |m, v| m.max(*v as f64));
    let l2: f64 = got
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt();
    let want_l2 = digest["l2"][[i]] as f64;
    assert!(
        (l2 - want_l2).abs() <= tol * global * (got.len() as f64).sqrt(),
        "{app} {name}: gradient norm {l2}, Keras {want_l2}"
    );
    for k in 0..digest["sample"].shape()[1] {
        let at = digest["sample_index"][[i, k]] as usize;
        let want = digest["sample"][[i, k]] as f64;
        let d = (got[at] as f64 - want).abs();
        assert!(
            d <= tol * global,
            "{app} {name}[{at}]: gradient {} vs Keras {want} (largest gradient {global}, \
             tolerance {tol} of it)",
            got[at]
        );
    }
}

/// How far Keras's own gradients move between its eager and graph
/// kernels, relative to the largest gradient (NAME.params.txt): deep
/// networks in training mode on a small batch amplify float rounding, and
/// no implementation can agree with Keras more closely than Keras agrees
/// with itself.
fn keras_self_agreement(f: &HashMap<String, String>) -> f64 {
    keras_self_agreement_in(f, "training")
}

/// The same for `mode` ("training" or "inference") gradients.
fn keras_self_agreement_in(f: &HashMap<String, String>, mode: &str) -> f64 {
    f.get(&format!("eager_vs_graph_{mode}_loss_rel"))
        .and_then(|l| l.split("grads rel to global max|g|: ").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `f32_input_ulp_perturbation_training_grads_rel_to_global_max`, where
/// make_f64_oracles.py measured it.
fn ulp_sensitivity(f: &HashMap<String, String>) -> f64 {
    f.get("f32_input_ulp_perturbation_training_grads_rel_to_global_max")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn check_app(app: &str) {
    let f = facts(app);
    let model = Model::load(&fixture(&format!("{app}.json"))).expect("imports");
    let count = |k: &str| f[k].parse::<usize>().unwrap();
    assert_eq!(model.param_count(), count("total_params"), "{app}");
    assert_eq!(model.trainable_count(), count("trainable_params"), "{app}");
    let summary = model.summary();
    assert!(
        summary.contains(&format!(
            "Total params: {}",
            thousands(count("total_params"))
        )),
        "{app}: {summary}"
    );

    let seed: u64 = f["model_seed"].parse().unwrap();
    let params = weights(&model, app, seed);
    // The regenerated weights are Keras's, in Keras's order.
    let wd: HashMap<String, ArrayD<f32>> =
        npy::load_npz(&fixture(&format!("{app}.weights_digest.npz")))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(wd["l2"].len(), model.param_specs().len(), "{app}");
    for (i, spec) in model.param_specs().iter().enumerate() {
        let w = &params.as_slice()[spec.offset..spec.offset + spec.len];
        for k in 0..wd["sample"].shape()[1] {
            let at = wd["sample_index"][[i, k]] as usize;
            assert_eq!(w[at], wd["sample"][[i, k]], "{app} {}[{at}]", spec.name);
        }
    }
    let x = npy::load_npy(&fixture(&format!("{app}.input.npy"))).unwrap();
    let want = npy::load_npy(&fixture(&format!("{app}.expected.npy"))).unwrap();
    let got = model.predict(&params, x.view()).unwrap();
    let d = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d <= 1e-4, "{app}: predict differs from Keras by {d}");

    // Inference-mode gradients: every layer's backward pass, without the
    // ill-conditioning of batch statistics over a small batch. 1e-4 of the
    // largest gradient, or four times what Keras's own eager and graph runs
    // differ by where that is more (deep Xception: a different GEMM
    // summation order alone moves its first kernel's gradient by 2.7e-4).
    let inference_tol = (4.0 * keras_self_agreement_in(&f, "inference")).max(1e-4);
    let labels = npy::load_labels(&fixture(&format!("{app}.labels.npy"))).unwrap();
    let g = model
        .inference_loss_and_grad_sum(&params, x.view(), &labels)
        .unwrap();
    let digest: HashMap<String, ArrayD<f32>> =
        npy::load_npz(&fixture(&format!("{app}.grads_digest.npz")))
            .unwrap()
            .into_iter()
            .collect();
    let n = labels.len() as f64;
    for (i, spec) in model
        .param_specs()
        .iter()
        .filter(|s| s.trainable)
        .enumerate()
    {
        let mean: Vec<f32> = g.grad[spec.offset..spec.offset + spec.len]
            .iter()
            .map(|v| (*v as f64 / n) as f32)
            .collect();
        check_digest(app, &spec.name, &mean, &digest, i, inference_tol);
    }

    // Training mode: on the Dropout-free twin where Keras made one.
    let train_json = fixture(&format!("{app}.train.json"));
    let train_model = if train_json.exists() {
        Model::load(&train_json).unwrap()
    } else {
        model.clone()
    };
    let params = train_model.params_from_flat(params.into_vec()).unwrap();
    // Training-mode oracles use a batch of their own (see make_app_fixtures.py).
    let x = npy::load_npy(&fixture(&format!("{app}.train_input.npy"))).unwrap();
    let labels = npy::load_labels(&fixture(&format!("{app}.train_labels.npy"))).unwrap();
    let g = train_model
        .loss_and_grad_sum(&params, x.view(), &labels, None)
        .unwrap();
    let n = labels.len() as f64;
    let loss = g.loss_sum / n;
    let want_loss = *npy::load_npy(&fixture(&format!("{app}.train_loss.npy")))
        .unwrap()
        .iter()
        .next()
        .unwrap() as f64;
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{app}: training loss {loss}, Keras {want_loss}"
    );
    let digest: HashMap<String, ArrayD<f32>> =
        npy::load_npz(&fixture(&format!("{app}.train_grads_digest.npz")))
            .unwrap()
            .into_iter()
            .collect();
    let trainable: Vec<_> = train_model
        .param_specs()
        .iter()
        .filter(|s| s.trainable)
        .collect();
    assert_eq!(trainable.len(), digest["l2"].len(), "{app}");
    // 1e-4 of the largest gradient, or Keras's own spread: four times the
    // eager-vs-graph difference, or how far Keras's gradients move when the
    // input moves by one float32 ulp (a ReLU input near zero changing
    // sign; see make_f64_oracles.py).
    let tol = (4.0 * keras_self_agreement(&f))
        .max(ulp_sensitivity(&f))
        .max(1e-4);
    for (i, spec) in trainable.iter().enumerate() {
        let mean: Vec<f32> = g.grad[spec.offset..spec.offset + spec.len]
            .iter()
            .map(|v| (*v as f64 / n) as f32)
            .collect();
        check_digest(app, &spec.name, &mean, &digest, i, tol);
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn mobilenet() {
    check_app("mobilenet");
}

#[test]
fn mobilenet_v2() {
    check_app("mobilenet_v2");
}

#[test]
fn resnet50() {
    check_app("resnet50");
}

#[test]
fn densenet121() {
    check_app("densenet121");
}

#[test]
fn efficientnet_b0() {
    check_app("efficientnet_b0");
}

#[test]
fn nasnet_mobile() {
    check_app("nasnet_mobile");
}

#[test]
fn xception() {
    check_app("xception");
}

#[test]
fn vgg16() {
    check_app("vgg16");
}

#[test]
fn convnext_tiny() {
    check_app("convnext_tiny");
}
