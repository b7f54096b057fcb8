//! Losses against Keras 3: each case of tests/fixtures/keras/losses/cases.json
//! (made by make_loss_fixtures.py) is a one-layer model, a batch, and
//! Keras's loss value and gradients for that loss.

mod common;
use common::floats;

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use quern_compute::nn::{Loss, Model, Target};
use serde_json::Value;

#[test]
fn every_loss_matches_keras_value_and_gradient() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/keras/losses/cases.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cases.len(), 10);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let model = Model::from_keras_json(&case["model"].to_string()).unwrap();
        let loss = Loss::from_keras(&case["loss"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let w: Vec<f32> = case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        let params = model.params_from_flat(w).unwrap();
        let x = floats(&case["x"]);
        let n = x.len() / 5;
        let x = ArrayD::from_shape_vec(IxDyn(&[n, 5]), x).unwrap();
        let classes: Vec<u32>;
        let values: Vec<f32>;
        let target = if case.get("classes").is_some() {
            classes = case["classes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            Target::Classes(&classes)
        } else {
            values = floats(&case["values"]);
            Target::Values(&values)
        };
        let g = model
            .loss_and_grad_sum_with(&loss, &params, x.view(), target, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = case["loss_value"].as_f64().unwrap();
        let got = g.loss_sum / n as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{name}: loss {got}, Keras {want}"
        );
        let want: Vec<f32> = case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        for (i, (a, b)) in g.grad.iter().zip(&want).enumerate() {
            let a = a / n as f32;
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{name}: gradient {i} is {a}, Keras {b}"
            );
        }
        // Evaluation reports the same loss at inference (no dropout here).
        let e = model
            .evaluate_with(&loss, &params, x.view(), target)
            .unwrap();
        assert!(
            (e.loss_sum - g.loss_sum).abs() <= 1e-6 * g.loss_sum.abs().max(1.0),
            "{name}"
        );
    }
}

#[test]
fn losses_round_trip_through_keras_names() {
    for v in [
        serde_json::json!("mse"),
        serde_json::json!("binary_crossentropy"),
        serde_json::json!({"class_name": "Huber", "config": {"delta": 2.0}}),
        serde_json::json!({"class_name": "CategoricalCrossentropy",
            "config": {"from_logits": true, "label_smoothing": 0.1}}),
    ] {
        let l = Loss::from_keras(&v).unwrap();
        assert_eq!(Loss::from_keras(&l.to_keras()).unwrap(), l);
    }
    let e = Loss::from_keras(&serde_json::json!("kl_divergence")).unwrap_err();
    assert!(
        e.contains("kl_divergence") && e.contains("supported"),
        "{e}"
    );
}
