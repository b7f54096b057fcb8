//! Optimizers against Keras 3: each case of
//! tests/fixtures/keras/optimizers/cases.json (made by
//! make_optimizer_fixtures.py) is the optimizer as Keras serialises it in a
//! compile_config, two variables, six steps of gradients and the variables
//! after each step.

mod common;
use common::floats;

use std::path::PathBuf;

use quern_compute::nn::{parse_optimizer, Optimizer};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keras/optimizers/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_optimizer_follows_keras_step_by_step() {
    let cases = cases();
    assert!(cases.len() >= 20);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let config =
            parse_optimizer(&case["optimizer"]).unwrap_or_else(|p| panic!("{name}: {p:?}"));
        let init: Vec<Vec<f32>> = case["init"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let (a, b) = (init[0].len(), init[1].len());
        let mut w: Vec<f32> = init.concat();
        // The second variable is frozen in the `_frozen` cases: the
        // optimizer is not given it, and it must not move.
        let frozen = name.ends_with("_frozen");
        let vars = if frozen {
            vec![(0, a)]
        } else {
            vec![(0, a), (a, b)]
        };
        let mut opt = Optimizer::new(config, a + b).with_variables(vars);
        for (step, (g, after)) in case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["after"].as_array().unwrap())
            .enumerate()
        {
            let g: Vec<f32> = g.as_array().unwrap().iter().flat_map(floats).collect();
            let g = if frozen {
                let mut g = g;
                g[a..].fill(0.0);
                g
            } else {
                g
            };
            opt.step(&mut w, &g).unwrap();
            let want: Vec<f32> = after.as_array().unwrap().iter().flat_map(floats).collect();
            for (i, (got, want)) in w.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "{name}, step {}: w[{i}] = {got}, Keras {want}",
                    step + 1
                );
            }
        }
    }
}

#[test]
fn unsupported_optimizer_settings_are_named() {
    let v = serde_json::json!({"class_name": "Lion", "config": {"learning_rate": 0.1}});
    let p = parse_optimizer(&v).unwrap_err();
    assert!(p[0].contains("Lion") || p[0].contains("lion"), "{p:?}");
    let v = serde_json::json!({"class_name": "SGD", "config": {"learning_rate":
        {"class_name": "PolynomialDecay", "config": {}}, "use_ema": true}});
    let p = parse_optimizer(&v).unwrap_err();
    let all = p.join("; ");
    assert!(
        all.contains("PolynomialDecay") && all.contains("use_ema"),
        "{all}"
    );
}
