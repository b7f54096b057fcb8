//! Functional graphs against Keras: resnet_mini (BatchNormalization, a
//! residual Add, two branches joined by Concatenate) in inference and in
//! training mode.

mod common;
use common::{fixture, load, max_abs_diff};

use ndarray::Axis;
use quern_compute::nn::{npy, BatchSync, GradSum, LocalGroup, Loss, Model, Params, Target};

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

/// resnet_mini's training-mode loss and gradient sums over the fixture's
/// whole batch, in one process.
fn whole_batch() -> (Model, Params, GradSum) {
    let (model, params) = load("resnet_mini");
    let x = npy::load_npy(&fixture("resnet_mini.input.npy")).unwrap();
    let g = model
        .loss_and_grad_sum(&params, x.view(), &labels("resnet_mini"), None)
        .unwrap();
    (model, params, g)
}

/// The largest difference of the loss or a gradient from Keras's
/// training-mode oracle, as a share of the 1e-4 relative tolerance (at
/// most 1 passes). `grad` and `loss_sum` are sums over the fixture's batch.
fn keras_training_deviation(model: &Model, loss_sum: f64, grad: &[f32]) -> f32 {
    let n = labels("resnet_mini").len() as f64;
    let want_loss = npy::load_npy(&fixture("resnet_mini.train_loss.npy")).unwrap();
    let loss = loss_sum / n;
    let wl = *want_loss.iter().next().unwrap() as f64;
    let mut worst = ((loss - wl).abs() / (1e-4 * wl.abs().max(1.0))) as f32;
    let mut want = npy::load_npz(&fixture("resnet_mini.train_grads.npz")).unwrap();
    let trainable: Vec<_> = model.param_specs().iter().filter(|s| s.trainable).collect();
    assert_eq!(
        trainable.len(),
        want.len(),
        "one gradient per trainable weight"
    );
    want.sort_by_key(|(n, _)| n.trim_start_matches("arr_").parse::<usize>().unwrap_or(0));
    for (spec, (_, w)) in trainable.iter().zip(&want) {
        let got: Vec<f32> = grad[spec.offset..spec.offset + spec.len]
            .iter()
            .map(|v| *v / n as f32)
            .collect();
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let d = got
            .iter()
            .zip(w.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = worst.max(d / (1e-4 * scale.max(1e-2)));
    }
    worst
}

#[test]
fn resnet_mini_training_loss_and_gradients_match_keras() {
    let (model, _, g) = whole_batch();
    let worst = keras_training_deviation(&model, g.loss_sum, &g.grad);
    assert!(
        worst <= 1.0,
        "gradients differ from Keras by {worst}x the tolerance"
    );
    // Two BatchNormalization calls report their batch statistics.
    assert_eq!(g.stats.len(), 2);
}

/// The fixture's batch split 5/4/3 between three threads playing workers:
/// the gradient sums, the loss and the moving-statistics sums over the
/// shares, with or without exchanging BatchNormalization's sums.
fn split_between_workers(exchange: bool) -> (Model, GradSum) {
    let (model, params) = load("resnet_mini");
    let x = npy::load_npy(&fixture("resnet_mini.input.npy")).unwrap();
    let labels = labels("resnet_mini");
    let n = labels.len();
    let cuts = [0, n * 5 / 12, n * 9 / 12, n];
    let group = LocalGroup::new(3);
    let loss = Loss::default();
    let parts: Vec<GradSum> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|w| {
                let (model, params, x, labels) = (&model, &params, &x, &labels);
                let member = group.member(w);
                let loss = &loss;
                s.spawn(move || {
                    let share = x.slice_axis(Axis(0), (cuts[w]..cuts[w + 1]).into());
                    let target = Target::Classes(&labels[cuts[w]..cuts[w + 1]]);
                    let sync = exchange.then_some(&member as &dyn BatchSync);
                    model
                        .loss_and_grad_sum_streamed(
                            loss,
                            params,
                            share,
                            target,
                            None,
                            sync,
                            &mut |_, _| {},
                        )
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = parts[0].clone();
    for p in &parts[1..] {
        total.loss_sum += p.loss_sum;
        total
            .grad
            .iter_mut()
            .zip(&p.grad)
            .for_each(|(a, b)| *a += b);
        for (a, b) in total.stats.iter_mut().zip(&p.stats) {
            a.add(b).unwrap();
        }
    }
    (model, total)
}

#[test]
fn a_batch_split_between_workers_normalizes_over_the_whole_batch() {
    let (model, split) = split_between_workers(true);
    let worst = keras_training_deviation(&model, split.loss_sum, &split.grad);
    assert!(
        worst <= 1.0,
        "split gradients differ from Keras's whole batch by {worst}x the tolerance"
    );
    // The moving statistics see the whole batch too.
    let (_, _, whole) = whole_batch();
    for (a, b) in split.stats.iter().zip(&whole.stats) {
        assert_eq!(a.count, b.count);
        for (u, v) in a
            .sum
            .iter()
            .chain(&a.sum_sq)
            .zip(b.sum.iter().chain(&b.sum_sq))
        {
            assert!((u - v).abs() <= 1e-9 * v.abs().max(1.0), "{u} vs {v}");
        }
    }
    // Without the exchange each share is normalized on its own: not the
    // computation Keras does on the whole batch.
    let (_, ghost) = split_between_workers(false);
    let off = keras_training_deviation(&model, ghost.loss_sum, &ghost.grad);
    assert!(off > 10.0, "per-share statistics only {off}x off");
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
    let (model, params, g) = whole_batch();
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
