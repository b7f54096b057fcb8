//! Parity with real Keras on the fixtures made by Keras 3 (see
//! tests/fixtures/keras/README.md), model import, weights files and errors.

mod common;
use common::{fixture, load, max_abs_diff};

use std::path::PathBuf;

use ndarray::ArrayD;
use quern_compute::nn::{npy, Model, NnError};

fn check_predict(name: &str) {
    let (model, params) = load(name);
    let x = npy::load_npy(&fixture(&format!("{name}.input.npy"))).unwrap();
    let expected = npy::load_npy(&fixture(&format!("{name}.expected.npy"))).unwrap();
    let got = model.predict(&params, x.view()).unwrap();
    let d = max_abs_diff(&got, &expected);
    assert!(d <= 1e-4, "{name}: predict differs from Keras by {d}");
}

#[test]
fn predict_matches_keras_mlp() {
    check_predict("mlp");
}

#[test]
fn predict_matches_keras_seed_cnn() {
    check_predict("seed_cnn");
}

#[test]
fn layer_outputs_match_keras() {
    for name in ["mlp", "seed_cnn"] {
        let (model, params) = load(name);
        let x = npy::load_npy(&fixture(&format!("{name}.input.npy"))).unwrap();
        let expected = npy::load_npz(&fixture(&format!("{name}.layers.npz"))).unwrap();
        let outs = model.layer_outputs(&params, x.view()).unwrap();
        assert_eq!(outs.len(), model.layer_names().len());
        for (layer, out) in &outs {
            let (_, want) = expected
                .iter()
                .find(|(n, _)| n == layer)
                .unwrap_or_else(|| panic!("{name}: no Keras output for {layer}"));
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let d = max_abs_diff(out, want);
            assert!(
                d <= 1e-4 * scale,
                "{name}/{layer}: differs from Keras by {d} (scale {scale})"
            );
        }
    }
}

#[test]
fn gradients_match_keras() {
    for name in ["mlp", "seed_cnn"] {
        let (model, params) = load(name);
        let x = npy::load_npy(&fixture(&format!("{name}.input.npy"))).unwrap();
        let labels = npy::load_labels(&fixture(&format!("{name}.labels.npy"))).unwrap();
        let expected = npy::load_npz(&fixture(&format!("{name}.grads.npz"))).unwrap();
        let expected = model.params_from_arrays(&expected).unwrap();
        let g = model
            .loss_and_grad_sum(&params, x.view(), &labels, None)
            .unwrap();
        assert_eq!(g.count, labels.len() as u64);
        let n = labels.len() as f32;
        let mean = model
            .params_from_flat(g.grad.iter().map(|v| v / n).collect())
            .unwrap();
        for (i, spec) in model.param_specs().iter().enumerate() {
            let (a, b) = (mean.tensor(i), expected.tensor(i));
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                d <= 1e-4 * scale.max(1e-3),
                "{name} {}: gradient differs from Keras by {d} (max |g| {scale})",
                spec.name
            );
        }
    }
}

#[test]
fn summary_matches_keras() {
    for name in ["mlp", "seed_cnn"] {
        let (model, _) = load(name);
        let want = std::fs::read_to_string(fixture(&format!("{name}.summary.txt"))).unwrap();
        assert_eq!(model.summary(), want, "{name}");
    }
    let (model, _) = load("seed_cnn");
    assert_eq!(model.param_count(), 1_663_370);
    assert_eq!(model.input_shape(), &[28, 28, 1]);
    let s = model.summary();
    assert!(s.contains("1,663,370"));
    assert!(s.contains("(None, 7, 7, 64)"));
}

/// Shape, first and last value, and sum of absolute values of each array of
/// `get_weights()` of the `.keras` fixtures, as TensorFlow 2.21 / Keras 3.15
/// loads them (the archives hold the initial weights, not NAME.weights.npz;
/// biases are all zero).
type Expected = (&'static [usize], f64, f64, f64);
const SEED_CNN_KERAS: &[Expected] = &[
    (
        &[5, 5, 1, 32],
        0.06109294295310974,
        0.00012087821960449219,
        33.85374450683594,
    ),
    (&[32], 0.0, 0.0, 0.0),
    (
        &[5, 5, 32, 64],
        0.047915589064359665,
        0.013866115361452103,
        1283.8831787109375,
    ),
    (&[64], 0.0, 0.0, 0.0),
    (
        &[3136, 512],
        0.02780870720744133,
        0.025357995182275772,
        32561.419921875,
    ),
    (&[512], 0.0, 0.0, 0.0),
    (
        &[512, 10],
        0.10627675801515579,
        0.02132789045572281,
        278.3251953125,
    ),
    (&[10], 0.0, 0.0, 0.0),
];
const MLP_KERAS: &[Expected] = &[
    (
        &[784, 256],
        0.054412826895713806,
        -0.05355222523212433,
        7620.92138671875,
    ),
    (&[256], 0.0, 0.0, 0.0),
    (
        &[256, 128],
        0.11978897452354431,
        -0.08737283945083618,
        2055.43603515625,
    ),
    (&[128], 0.0, 0.0, 0.0),
    (
        &[128, 10],
        0.14297781884670258,
        0.010187089443206787,
        131.2369384765625,
    ),
    (&[10], 0.0, 0.0, 0.0),
];

#[test]
fn keras_archive_reads_h5_weights_as_keras_does() {
    for (name, want) in [("seed_cnn", SEED_CNN_KERAS), ("mlp", MLP_KERAS)] {
        let path = fixture(&format!("{name}.keras"));
        let archive = Model::open_keras(&path).unwrap();
        assert!(archive.has_h5_weights, "{name}");
        let (model, params) = Model::load_with_weights(&path, None).unwrap();
        assert_eq!(archive.weights.as_ref(), Some(&params), "{name}");
        assert_eq!(params.len(), model.param_count(), "{name}");
        let arrays = params.to_arrays();
        assert_eq!(arrays.len(), want.len(), "{name}");
        for (i, (a, &(shape, first, last, abs_sum))) in arrays.iter().zip(want).enumerate() {
            assert_eq!(a.shape(), shape, "{name} array {i}");
            let flat: Vec<f32> = a.iter().copied().collect();
            assert_eq!(f64::from(flat[0]), first, "{name} array {i} first value");
            assert_eq!(
                f64::from(flat[flat.len() - 1]),
                last,
                "{name} array {i} last value"
            );
            let sum: f64 = flat.iter().map(|v| f64::from(v.abs())).sum();
            assert!(
                (sum - abs_sum).abs() <= 1e-5 * abs_sum.max(1.0),
                "{name} array {i}: sum |w| {sum}, Keras {abs_sum}"
            );
        }
        // The archive's (initial) weights run: softmax rows sum to one.
        let x = npy::load_npy(&fixture(&format!("{name}.input.npy"))).unwrap();
        let probs = model.predict(&params, x.view()).unwrap();
        for row in probs.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-4, "{name}");
        }
    }
    // A weights file given explicitly wins over the archive's.
    let (model, params) =
        Model::load_with_weights(&fixture("mlp.keras"), Some(&fixture("mlp.weights.npz"))).unwrap();
    let (_, want) = load("mlp");
    assert_eq!(params, want);
    assert_eq!(model.param_count(), params.len());
}

/// `NAME.keras` rebuilt with its `model.weights.h5` replaced by `h5`.
fn keras_with_h5(name: &str, h5: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let bytes = std::fs::read(fixture(&format!("{name}.keras"))).unwrap();
    let mut src = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..src.len() {
        let mut f = src.by_index(i).unwrap();
        let fname = f.name().to_string();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        if fname == "model.weights.h5" {
            data = h5.to_vec();
        }
        out.start_file(fname, zip::write::SimpleFileOptions::default())
            .unwrap();
        out.write_all(&data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

fn inner_h5(name: &str) -> Vec<u8> {
    use std::io::Read;
    let bytes = std::fs::read(fixture(&format!("{name}.keras"))).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut data = Vec::new();
    zip.by_name("model.weights.h5")
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    data
}

#[test]
fn corrupt_h5_weights_in_keras_archive_name_the_file() {
    let h5 = inner_h5("mlp");
    let cases: [(&str, Vec<u8>); 3] = [
        ("garbage", b"this is not an HDF5 file".to_vec()),
        ("header only", h5[..512].to_vec()),
        ("truncated", h5[..h5.len() / 2].to_vec()),
    ];
    for (case, data) in cases {
        let archive = keras_with_h5("mlp", &data);
        let err = Model::from_keras_bytes(&archive, "broken.keras").unwrap_err();
        assert!(matches!(err, NnError::Weights(_)), "{case}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("broken.keras") && msg.contains("model.weights.h5"),
            "{case}: {msg}"
        );
    }
    // The weights of another model: the missing layer is named.
    let archive = keras_with_h5("mlp", &inner_h5("seed_cnn"));
    let msg = Model::from_keras_bytes(&archive, "other.keras")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("other.keras: model.weights.h5") && msg.contains("dense_2"),
        "{msg}"
    );
}

#[test]
fn npz_round_trip_keeps_keras_order_and_shapes() {
    let (model, params) = load("seed_cnn");
    let bytes = params.to_npz_bytes().unwrap();
    let back = model.params_from_npz_bytes(&bytes, "round trip").unwrap();
    assert_eq!(back, params);
    let arrays = npy::npz_to_arrays(&bytes, "round trip").unwrap();
    let original = npy::load_npz(&fixture("seed_cnn.weights.npz")).unwrap();
    assert_eq!(arrays.len(), original.len());
    for ((n1, a1), (n2, a2)) in arrays.iter().zip(&original) {
        assert_eq!(n1, n2);
        assert_eq!(a1, a2);
    }
    let flat = params.clone().into_vec();
    assert_eq!(flat.len(), 1_663_370);
    assert_eq!(model.params_from_flat(flat).unwrap(), params);

    let dir = tempdir();
    let path = dir.join("w.npz");
    params.save_npz(&path).unwrap();
    assert_eq!(model.load_params(&path).unwrap(), params);
    let x = npy::load_npy(&fixture("seed_cnn.input.npy")).unwrap();
    let y = dir.join("x.npy");
    npy::save_npy(&y, &x.view()).unwrap();
    assert_eq!(npy::load_npy(&y).unwrap(), x);
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quern-nn-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn default_init_is_seeded_glorot_and_zero_bias() {
    let (model, _) = load("seed_cnn");
    let a = model.init_params(7);
    let b = model.init_params(7);
    let c = model.init_params(8);
    assert_eq!(a, b);
    assert_ne!(a, c);
    // dense kernel (3136, 512): limit sqrt(6 / (3136 + 512))
    let k = a.tensor(4);
    let limit = (6.0f32 / (3136.0 + 512.0)).sqrt();
    assert!(k.iter().all(|v| v.abs() <= limit));
    assert!(k.iter().any(|v| v.abs() > 0.9 * limit));
    assert!(a.tensor(5).iter().all(|v| *v == 0.0));
}

fn seed_cnn_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("seed_cnn.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn unknown_layer_is_refused_naming_layer_and_class() {
    let mut v = seed_cnn_json();
    v["config"]["layers"][2]["class_name"] = "LSTM".into();
    let err = Model::from_keras_json(&v.to_string()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, NnError::Unsupported(_)));
    assert!(
        msg.contains("LSTM") && msg.contains("max_pooling2d") && msg.contains("supported:"),
        "{msg}"
    );
}

#[test]
fn unsupported_option_is_refused_naming_it() {
    let mut v = seed_cnn_json();
    v["config"]["layers"][1]["config"]["kernel_constraint"] =
        serde_json::json!({"class_name": "MaxNorm"});
    let msg = Model::from_keras_json(&v.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("kernel_constraint") && msg.contains("conv2d"),
        "{msg}"
    );

    let mut v = seed_cnn_json();
    v["config"]["layers"][1]["config"]["padding"] = "causal".into();
    let msg = Model::from_keras_json(&v.to_string())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("padding") && msg.contains("causal"), "{msg}");

    let mut v = seed_cnn_json();
    v["config"]["layers"][6]["config"]["activation"] = "squareplus".into();
    let msg = Model::from_keras_json(&v.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("activation") && msg.contains("squareplus") && msg.contains("dense"),
        "{msg}"
    );

    let mut v = seed_cnn_json();
    v["config"]["layers"][6]["config"]["kernel_regularizer"] =
        serde_json::json!({"class_name": "OrthogonalRegularizer"});
    let msg = Model::from_keras_json(&v.to_string())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("kernel_regularizer"), "{msg}");
}

#[test]
fn every_unsupported_part_is_listed_in_one_error() {
    let mut v = seed_cnn_json();
    v["config"]["layers"][1]["config"]["kernel_constraint"] =
        serde_json::json!({"class_name": "MaxNorm"});
    v["config"]["layers"][2]["class_name"] = "LSTM".into();
    v["config"]["layers"][6]["config"]["activation"] = "squareplus".into();
    let err = Model::from_keras_json(&v.to_string()).unwrap_err();
    let NnError::Unsupported(problems) = &err else {
        panic!("expected the list of problems, got {err}");
    };
    assert_eq!(problems.len(), 3, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("3 problems"), "{msg}");
    for part in ["kernel_constraint", "LSTM", "squareplus"] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

#[test]
fn malformed_json_gives_a_clear_error() {
    let err = Model::from_keras_json("{\"class_name\": \"Sequential\", ").unwrap_err();
    assert!(err.to_string().starts_with("malformed model JSON"), "{err}");
    let err = Model::from_keras_json("[1, 2]").unwrap_err();
    assert!(err.to_string().contains("malformed model JSON"), "{err}");
    let err =
        Model::from_keras_json("{\"class_name\": \"Sequential\", \"config\": {}}").unwrap_err();
    assert!(err.to_string().contains("config.layers"), "{err}");
}

#[test]
fn npz_with_wrong_shape_names_array_and_both_shapes() {
    let (model, params) = load("seed_cnn");
    let mut arrays: Vec<(String, ArrayD<f32>)> = params
        .to_arrays()
        .into_iter()
        .enumerate()
        .map(|(i, a)| (format!("arr_{i}"), a))
        .collect();
    arrays[4].1 = ArrayD::zeros(ndarray::IxDyn(&[3136, 511]));
    let views: Vec<_> = arrays.iter().map(|(n, a)| (n.clone(), a.view())).collect();
    let bytes = npy::arrays_to_npz(&views).unwrap();
    let msg = model
        .params_from_npz_bytes(&bytes, "bad.npz")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("arr_4") && msg.contains("(3136, 512)") && msg.contains("(3136, 511)"),
        "{msg}"
    );
    // Too few arrays.
    let bytes = npy::arrays_to_npz(&views[..3]).unwrap();
    let msg = model
        .params_from_npz_bytes(&bytes, "short.npz")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("3 arrays given") && msg.contains("needs 8"),
        "{msg}"
    );
    // Not a zip at all.
    let msg = model
        .params_from_npz_bytes(b"hello", "junk.npz")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("junk.npz"), "{msg}");
}

#[test]
fn wrong_input_shape_is_refused() {
    let (model, params) = load("mlp");
    let x = ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 28, 28]));
    let msg = model.predict(&params, x.view()).unwrap_err().to_string();
    assert!(
        msg.contains("(None, 28, 28, 1)") && msg.contains("(2, 28, 28)"),
        "{msg}"
    );
}

#[test]
fn evaluation_counts_and_merges() {
    let (model, params) = load("mlp");
    let x = npy::load_npy(&fixture("mlp.input.npy")).unwrap();
    let labels = npy::load_labels(&fixture("mlp.labels.npy")).unwrap();
    let all = model.evaluate(&params, x.view(), &labels).unwrap();
    assert_eq!(all.count, 8);
    assert_eq!(all.confusion.iter().sum::<u64>(), 8);
    let g = model
        .loss_and_grad_sum(&params, x.view(), &labels, None)
        .unwrap();
    assert_eq!(g.correct, all.correct);
    assert!((g.loss_sum - all.loss_sum).abs() < 1e-9);
    let mut a = model
        .evaluate(
            &params,
            x.slice(ndarray::s![..3, .., .., ..]).into_dyn(),
            &labels[..3],
        )
        .unwrap();
    let b = model
        .evaluate(
            &params,
            x.slice(ndarray::s![3.., .., .., ..]).into_dyn(),
            &labels[3..],
        )
        .unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a.confusion, all.confusion);
    assert_eq!(a.correct, all.correct);
}

#[test]
fn functional_configs_without_input_and_output_lists_import() {
    let inbound = |from: &str| {
        serde_json::json!([{"args": [{"class_name": "__keras_tensor__",
            "config": {"shape": [null, 4], "dtype": "float32", "keras_history": [from, 0, 0]}}],
            "kwargs": {}}])
    };
    let model = |second_from: &str| {
        serde_json::json!({"class_name": "Functional", "config": {"name": "f", "layers": [
            {"class_name": "InputLayer", "name": "in", "config": {"batch_shape": [null, 4], "name": "in"}, "inbound_nodes": []},
            {"class_name": "Dense", "name": "a", "config": {"name": "a", "units": 3, "activation": "relu"}, "inbound_nodes": inbound("in")},
            {"class_name": "Dense", "name": "b", "config": {"name": "b", "units": 2, "activation": "softmax"}, "inbound_nodes": inbound(second_from)}
        ]}})
        .to_string()
    };
    let m = Model::from_keras_json(&model("a")).unwrap();
    assert_eq!(m.param_count(), 4 * 3 + 3 + 3 * 2 + 2);
    assert_eq!(m.output_shape(), &[2]);
    // A reference to a layer that does not exist names the stuck layer.
    let msg = Model::from_keras_json(&model("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("b") && msg.contains("no layer produces"),
        "{msg}"
    );
}

#[test]
fn compile_settings_come_from_the_model() {
    let (model, _) = load("resnet_mini");
    let c = model
        .compile_settings()
        .unwrap()
        .expect("resnet_mini is compiled");
    assert_eq!(
        c.optimizer,
        quern_compute::nn::OptimizerConfig::from(quern_compute::nn::Sgd {
            lr: 0.01,
            momentum: 0.9,
            nesterov: false
        })
    );
    assert_eq!(c.loss, quern_compute::nn::Loss::default());
    assert_eq!(c.metrics, vec!["accuracy".to_string()]);

    // Supported settings come through: RMSprop with clipping.
    let mut v = seed_cnn_json();
    v["compile_config"]["optimizer"]["class_name"] = "RMSprop".into();
    v["compile_config"]["optimizer"]["config"]["clipnorm"] = 1.0.into();
    let m = Model::from_keras_json(&v.to_string()).unwrap();
    let c = m.compile_settings().unwrap().unwrap();
    assert_eq!(c.optimizer.clipnorm, Some(1.0));

    // Unsupported ones are all named, with the flags to use instead.
    v["compile_config"]["optimizer"]["class_name"] = "Lion".into();
    v["compile_config"]["loss"] = "kl_divergence".into();
    let m = Model::from_keras_json(&v.to_string()).unwrap();
    let msg = m.compile_settings().unwrap_err().to_string();
    assert!(
        msg.contains("lion") && msg.contains("kl_divergence") && msg.contains("--optimizer"),
        "{msg}"
    );
    v.as_object_mut().unwrap().remove("compile_config");
    let m = Model::from_keras_json(&v.to_string()).unwrap();
    assert!(m.compile_settings().unwrap().is_none());
}
