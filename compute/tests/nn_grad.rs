//! Backward passes against central finite differences, optimizer updates
//! against hand-computed values, and determinism across thread counts.

use ndarray::{ArrayD, IxDyn};
use quern_compute::nn::{Adam, DropoutRng, Model, Optimizer, Params, Sgd, SplitMix64};
use serde_json::{json, Value};

fn sequential(input: &[usize], layers: Vec<Value>) -> Model {
    let mut batch_shape = vec![Value::Null];
    batch_shape.extend(input.iter().map(|d| json!(d)));
    let mut all = vec![
        json!({"class_name": "InputLayer", "config": {"batch_shape": batch_shape, "name": "input"}}),
    ];
    all.extend(layers);
    let v = json!({"class_name": "Sequential", "config": {"name": "t", "layers": all}});
    Model::from_keras_json(&v.to_string()).expect("test model builds")
}

fn layer(class: &str, name: &str, config: Value) -> Value {
    let mut c = config;
    c["name"] = json!(name);
    json!({"class_name": class, "config": c})
}

fn conv(name: &str, filters: usize, k: usize, s: usize, padding: &str, act: &str) -> Value {
    layer(
        "Conv2D",
        name,
        json!({"filters": filters, "kernel_size": [k, k], "strides": [s, s], "padding": padding, "activation": act}),
    )
}

fn dense(name: &str, units: usize, act: &str) -> Value {
    layer("Dense", name, json!({"units": units, "activation": act}))
}

fn flatten() -> Value {
    layer("Flatten", "flatten", json!({}))
}

fn random_input(model: &Model, n: usize, seed: u64) -> ArrayD<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut dims = vec![n];
    dims.extend_from_slice(model.input_shape());
    let len = dims.iter().product();
    ArrayD::from_shape_vec(
        IxDyn(&dims),
        (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect(),
    )
    .unwrap()
}

fn loss(
    model: &Model,
    p: &Params,
    x: &ArrayD<f32>,
    labels: &[u32],
    dropout: Option<DropoutRng>,
) -> f64 {
    model
        .loss_and_grad_sum(p, x.view(), labels, dropout)
        .unwrap()
        .loss_sum
}

/// Compares the analytic gradient of the summed loss with central
/// differences on up to `samples` coordinates of every parameter tensor.
/// f32 forward passes limit precision, so the step is fairly large and the
/// tolerance relative to the tensor's largest gradient.
fn check_gradients(model: &Model, dropout: Option<DropoutRng>, seed: u64) {
    let n = 3;
    let x = random_input(model, n, seed);
    let classes = model.output_shape()[0] as u64;
    let labels: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 7 + seed) % classes) as u32)
        .collect();
    let mut params = model.init_params(seed);
    // Non-zero biases, so relu and pooling ties are unlikely.
    let mut rng = SplitMix64::new(seed ^ 99);
    for v in params.as_mut_slice() {
        *v += (rng.next_f32() - 0.5) * 0.2;
    }
    let g = model
        .loss_and_grad_sum(&params, x.view(), &labels, dropout)
        .unwrap();
    let eps = 2e-3f32;
    let mid = loss(model, &params, &x, &labels, dropout);
    let (mut checked, mut kinks) = (0, 0);
    for spec in model.param_specs() {
        let analytic = &g.grad[spec.offset..spec.offset + spec.len];
        let scale = analytic
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(1e-2);
        let step = (spec.len / 12).max(1);
        for i in (0..spec.len).step_by(step) {
            let idx = spec.offset + i;
            let orig = params.as_slice()[idx];
            params.as_mut_slice()[idx] = orig + eps;
            let up = loss(model, &params, &x, &labels, dropout);
            params.as_mut_slice()[idx] = orig - eps;
            let down = loss(model, &params, &x, &labels, dropout);
            params.as_mut_slice()[idx] = orig;
            // A relu or max-pool switch inside [-eps, eps] makes the two
            // one-sided slopes disagree; such points say nothing about the
            // backward pass, so they are skipped (and counted).
            let right = ((up - mid) / eps as f64) as f32;
            let left = ((mid - down) / eps as f64) as f32;
            checked += 1;
            if (right - left).abs() > 0.05 * scale {
                kinks += 1;
                continue;
            }
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let err = (fd - analytic[i]).abs();
            assert!(
                err <= 2e-2 * scale,
                "{} [{i}]: finite difference {fd}, backward {} (scale {scale})",
                spec.name,
                analytic[i]
            );
        }
    }
    assert!(
        kinks * 5 <= checked,
        "{kinks} of {checked} points were at kinks"
    );
}

#[test]
fn dense_gradients() {
    let m = sequential(
        &[6],
        vec![
            dense("d0", 5, "tanh"),
            dense("d1", 4, "relu"),
            dense("out", 3, "softmax"),
        ],
    );
    check_gradients(&m, None, 1);
    let m = sequential(
        &[6],
        vec![
            dense("d0", 5, "sigmoid"),
            dense("out", 3, "linear"),
            layer("Activation", "sm", json!({"activation": "softmax"})),
        ],
    );
    check_gradients(&m, None, 2);
}

#[test]
fn conv_gradients_same_and_valid_stride_1_and_2() {
    for (k, s, pad) in [
        (3, 1, "same"),
        (3, 1, "valid"),
        (3, 2, "same"),
        (3, 2, "valid"),
        (2, 2, "same"),
        (1, 1, "valid"),
        (4, 2, "same"),
    ] {
        let m = sequential(
            &[7, 6, 2],
            vec![
                conv("c0", 3, 2, 1, "same", "tanh"),
                conv("c1", 4, k, s, pad, "linear"),
                flatten(),
                dense("out", 3, "softmax"),
            ],
        );
        check_gradients(&m, None, 3 + k as u64 + s as u64);
    }
}

#[test]
fn pooling_gradients() {
    for class in ["MaxPooling2D", "AveragePooling2D"] {
        for (p, s, pad) in [
            (2, 2, "valid"),
            (3, 2, "same"),
            (2, 1, "same"),
            (3, 3, "valid"),
        ] {
            let m = sequential(
                &[7, 7, 2],
                vec![
                    conv("c0", 3, 3, 1, "same", "linear"),
                    layer(
                        class,
                        "pool",
                        json!({"pool_size": [p, p], "strides": [s, s], "padding": pad}),
                    ),
                    flatten(),
                    dense("out", 3, "softmax"),
                ],
            );
            check_gradients(&m, None, 11 + p as u64);
        }
    }
}

#[test]
fn activation_gradients() {
    for act in ["relu", "sigmoid", "tanh", "softmax", "linear"] {
        let m = sequential(
            &[4, 4, 2],
            vec![
                conv("c0", 3, 3, 1, "same", "linear"),
                layer("Activation", "act", json!({"activation": act})),
                flatten(),
                dense("d1", 5, act),
                dense("out", 3, "softmax"),
            ],
        );
        check_gradients(&m, None, 21);
    }
}

#[test]
fn non_softmax_output_gradients() {
    // Sparse CCE on outputs that are not a softmax (sigmoid "probabilities").
    let m = sequential(
        &[5],
        vec![dense("d0", 4, "tanh"), dense("out", 3, "sigmoid")],
    );
    check_gradients(&m, None, 5);
}

#[test]
fn dropout_and_flatten_gradients() {
    let m = sequential(
        &[4, 4, 1],
        vec![
            conv("c0", 2, 3, 1, "valid", "tanh"),
            flatten(),
            layer("Dropout", "drop", json!({"rate": 0.5})),
            dense("out", 3, "softmax"),
        ],
    );
    check_gradients(
        &m,
        Some(DropoutRng {
            seed: 9,
            first_sample: 0,
        }),
        6,
    );
    check_gradients(&m, None, 6);
}

#[test]
fn dropout_masks_depend_on_seed_and_sample_not_on_split() {
    let m = sequential(
        &[40],
        vec![
            layer("Dropout", "drop", json!({"rate": 0.5})),
            dense("out", 3, "softmax"),
        ],
    );
    let p = m.init_params(1);
    let x = ArrayD::from_elem(IxDyn(&[4, 40]), 1.0f32);
    let d = |seed, first| {
        Some(DropoutRng {
            seed,
            first_sample: first,
        })
    };
    let whole = m.forward(&p, x.view(), d(5, 10)).unwrap();
    let head = m
        .forward(&p, x.slice(ndarray::s![..2, ..]).into_dyn(), d(5, 10))
        .unwrap();
    let tail = m
        .forward(&p, x.slice(ndarray::s![2.., ..]).into_dyn(), d(5, 12))
        .unwrap();
    assert_eq!(whole.slice(ndarray::s![..2, ..]).into_dyn(), head.view());
    assert_eq!(whole.slice(ndarray::s![2.., ..]).into_dyn(), tail.view());
    assert_ne!(whole, m.forward(&p, x.view(), d(6, 10)).unwrap());
    assert_eq!(
        m.forward(&p, x.view(), None).unwrap(),
        m.predict(&p, x.view()).unwrap()
    );
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let m = sequential(
        &[16, 16, 3],
        vec![
            conv("c0", 16, 5, 1, "same", "relu"),
            layer("MaxPooling2D", "p", json!({"pool_size": [2, 2]})),
            // 5x5 over 16 channels: the Winograd path, whose kernel
            // gradient sums over groups of samples.
            conv("cw", 16, 5, 1, "same", "relu"),
            conv("c1", 16, 3, 2, "same", "relu"),
            flatten(),
            dense("d", 64, "relu"),
            layer("Dropout", "drop", json!({"rate": 0.3})),
            dense("out", 10, "softmax"),
        ],
    );
    let x = random_input(&m, 37, 4);
    let labels: Vec<u32> = (0..37).map(|i| i % 10).collect();
    let p = m.init_params(3);
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                m.loss_and_grad_sum(
                    &p,
                    x.view(),
                    &labels,
                    Some(DropoutRng {
                        seed: 1,
                        first_sample: 0,
                    }),
                )
                .unwrap()
            })
    };
    let one = run(1);
    // More threads than any split has blocks, too.
    for threads in [2, 3, 16] {
        let other = run(threads);
        assert_eq!(
            one.loss_sum.to_bits(),
            other.loss_sum.to_bits(),
            "{threads} threads"
        );
        assert!(
            one.grad
                .iter()
                .zip(&other.grad)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{threads} threads"
        );
    }
}

#[test]
fn sgd_plain_momentum_and_nesterov_match_keras_formulas() {
    let g = [0.5f32, -1.0];
    let mut w = [1.0f32, 2.0];
    let mut opt = Optimizer::new(
        Sgd {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
        },
        2,
    );
    opt.step(&mut w, &g).unwrap();
    assert_eq!(w, [1.0 - 0.05, 2.0 + 0.1]);

    // velocity = m*v - lr*g; w += v
    let mut w = [1.0f32, 2.0];
    let mut opt = Optimizer::new(
        Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
        },
        2,
    );
    opt.step(&mut w, &g).unwrap(); // v = -0.05, 0.1
    opt.step(&mut w, &g).unwrap(); // v = -0.095, 0.19
    let expect = [1.0 - 0.05 - 0.095, 2.0 + 0.1 + 0.19];
    assert!(
        w.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-6),
        "{w:?}"
    );

    // nesterov: w += m*v - lr*g with the new v
    let mut w = [1.0f32, 2.0];
    let mut opt = Optimizer::new(
        Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
        },
        2,
    );
    opt.step(&mut w, &g).unwrap(); // v=-0.05 -> w += -0.045 - 0.05
    opt.step(&mut w, &g).unwrap(); // v=-0.095 -> w += -0.0855 - 0.05
    let expect = [1.0 - 0.095 - 0.1355, 2.0 + 0.19 + 0.271];
    assert!(
        w.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-6),
        "{w:?}"
    );
    assert_eq!(opt.iterations, 2);
}

#[test]
fn adam_matches_keras_formula() {
    let mut w = [1.0f32, -2.0];
    let grads = [[0.5f32, -0.25], [0.1, 0.3]];
    let mut opt = Optimizer::new(Adam::default(), 2);
    let (lr, b1, b2, eps) = (0.001f64, 0.9f64, 0.999f64, 1e-7f64);
    let mut m = [0.0f64; 2];
    let mut v = [0.0f64; 2];
    let mut wx = [1.0f64, -2.0];
    for (t, g) in grads.iter().enumerate() {
        opt.step(&mut w, g).unwrap();
        let t = (t + 1) as i32;
        let alpha = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
        for i in 0..2 {
            let gi = g[i] as f64;
            m[i] += (gi - m[i]) * (1.0 - b1);
            v[i] += (gi * gi - v[i]) * (1.0 - b2);
            wx[i] -= m[i] * alpha / (v[i].sqrt() + eps);
        }
    }
    for i in 0..2 {
        assert!((w[i] as f64 - wx[i]).abs() < 1e-6, "{w:?} vs {wx:?}");
    }
    // First Adam step moves each weight by about lr against the gradient sign.
    assert!(opt.step(&mut w, &[1.0]).is_err());
}
