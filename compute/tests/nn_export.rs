//! `.keras` files quern writes, read back by quern and, when
//! QUERN_KERAS_PYTHON names a Python with Keras 3 (`.ci/run` installs one),
//! by Keras itself: `load_model`, the same predictions within 1e-5, and
//! one more `fit` epoch (tests/fixtures/keras/scripts/check_export.py).

use std::path::PathBuf;

use quern_compute::nn::{npy, Adam, Model, OptimizerConfig, Params};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/keras")
}

/// Models with what the export must get right: BatchNormalization's
/// statistics, a nested model's weights under its own group, a shared
/// layer, a frozen layer, Normalization's integer count.
fn cases() -> Vec<(String, Model, Params)> {
    let mut out = Vec::new();
    let (m, p) = Model::load_with_weights(
        &root().join("resnet_mini.json"),
        Some(&root().join("resnet_mini.weights.npz")),
    )
    .unwrap();
    out.push(("resnet_mini".to_string(), m, p));
    for family in ["nested", "shared", "frozen", "preprocessing"] {
        let dir = root().join("layers");
        let (m, p) = Model::load_with_weights(
            &dir.join(format!("{family}.json")),
            Some(&dir.join(format!("{family}.weights.npz"))),
        )
        .unwrap();
        out.push((family.to_string(), m, p));
    }
    let m = Model::load(&root().join("apps/efficientnet_b0.json")).unwrap();
    let p = m.init_params(3);
    out.push(("efficientnet_b0".to_string(), m, p));
    out
}

fn input_for(model: &Model, n: usize) -> ndarray::ArrayD<f32> {
    let mut dims = vec![n];
    dims.extend_from_slice(model.input_shape());
    let len: usize = dims.iter().product();
    let mut rng = quern_compute::nn::SplitMix64::new(9);
    ndarray::ArrayD::from_shape_vec(
        ndarray::IxDyn(&dims),
        (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect(),
    )
    .unwrap()
}

#[test]
fn exported_models_read_back_with_the_same_weights() {
    let compile = OptimizerConfig::from(Adam::default()).keras_compile_config();
    for (name, model, params) in cases() {
        let bytes = model.to_keras_bytes(&params, Some(&compile)).unwrap();
        let back = Model::from_keras_bytes(&bytes, &name).unwrap();
        assert!(back.has_h5_weights, "{name}");
        let w = back.weights.expect("weights in the archive");
        assert_eq!(
            w.as_slice(),
            params.as_slice(),
            "{name}: weights round-trip"
        );
        assert_eq!(back.model.param_count(), model.param_count());
        // The compile settings travel with it.
        let c = back.model.compile_settings().unwrap().unwrap();
        assert_eq!(c.optimizer, OptimizerConfig::from(Adam::default()));
    }
}

#[test]
fn keras_opens_exported_models_predicts_the_same_and_fits() {
    let Some(python) = std::env::var_os("QUERN_KERAS_PYTHON") else {
        eprintln!(
            "not checked against Keras: set QUERN_KERAS_PYTHON to a Python with keras \
             (.ci/run does)"
        );
        return;
    };
    let dir = tempdir();
    let compile = OptimizerConfig::from(Adam::default()).keras_compile_config();
    for (name, model, params) in cases() {
        let x = input_for(&model, 4);
        let y = model.predict(&params, x.view()).unwrap();
        let file = dir.join(format!("{name}.keras"));
        model.save_keras(&file, &params, Some(&compile)).unwrap();
        let xp = dir.join(format!("{name}.x.npy"));
        let yp = dir.join(format!("{name}.y.npy"));
        npy::save_npy(&xp, &x.view()).unwrap();
        npy::save_npy(&yp, &y.view()).unwrap();
        let out = std::process::Command::new(&python)
            .arg(root().join("scripts/check_export.py"))
            .args([&file, &xp, &yp])
            .output()
            .expect("run the Keras check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: Keras could not use the exported file: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["compiled"], true, "{name}: {report}");
    }
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("quern-export-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_keras_saved_file_with_named_and_nested_layers_reads_as_keras_wrote_it() {
    // Keras 3 files variables by class-based names (`layers/conv2d`,
    // `layers/sequential/layers/batch_normalization`), not by the layers'
    // own names (`pre`, `inner_seq`).
    let dir = root().join("layers");
    let archive = Model::open_keras(&dir.join("nested.keras")).unwrap();
    let want = archive
        .model
        .load_params(&dir.join("nested.weights.npz"))
        .unwrap();
    assert_eq!(archive.weights.unwrap().as_slice(), want.as_slice());
}
