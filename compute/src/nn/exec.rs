//! Runs a layer graph forward and backward over flat f32 buffers.
//!
//! Calls run in topological order. At inference each activation is freed
//! after its last reader; in training every activation is kept until the
//! backward pass has used it, and freed as soon as it has. Where a tensor
//! feeds several layers, their gradients are added in a fixed (reverse
//! topological) order, so results do not depend on the number of threads.

use super::graph::Graph;
use super::layers::{Back, Ctx, Noise, Saved, StatSums};
use super::model::ParamSpec;
use super::sync::BatchSync;

/// Dropout and noise randomness for one training call: sample `i` of the
/// batch draws from a stream keyed by `(seed, layer call, first_sample + i)`,
/// so a batch split between workers (each passing its share's offset) gets
/// the same masks as the whole batch in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutRng {
    pub seed: u64,
    pub first_sample: u64,
}

/// A training-mode pass: dropout randomness (None: dropout and noise off)
/// and, when the batch is split between workers, the link over which
/// BatchNormalization exchanges its sums.
#[derive(Clone, Copy, Default)]
pub(crate) struct Train<'a> {
    pub dropout: Option<DropoutRng>,
    pub sync: Option<&'a dyn BatchSync>,
}

/// What the backward pass needs from the forward pass.
pub(crate) struct Tape {
    vals: Vec<Option<Vec<f32>>>,
    saved: Vec<Saved>,
}

impl Tape {
    /// The value of a tensor that is still held.
    pub fn take(&mut self, t: usize) -> Option<Vec<f32>> {
        self.vals[t].take()
    }

    pub fn get(&self, t: usize) -> Option<&[f32]> {
        self.vals[t].as_deref()
    }
}

pub(crate) struct Exec<'a> {
    pub graph: &'a Graph,
    pub specs: &'a [ParamSpec],
}

impl Exec<'_> {
    fn weights<'p>(&self, layer: usize, params: &'p [f32]) -> Vec<&'p [f32]> {
        self.graph.layers[layer]
            .params
            .iter()
            .map(|&i| {
                let s = &self.specs[i];
                &params[s.offset..s.offset + s.len]
            })
            .collect()
    }

    /// The call after which each tensor is no longer read.
    fn last_reads(&self) -> Vec<usize> {
        let mut last = vec![usize::MAX; self.graph.shapes.len()];
        for (ci, c) in self.graph.calls.iter().enumerate() {
            for &t in &c.inputs {
                last[t] = ci;
            }
        }
        last
    }

    /// Runs every call. With `train`, batch statistics and noise are on and
    /// every activation is kept for [`backward`](Self::backward); without,
    /// activations are freed after their last reader unless `keep_all`.
    pub fn forward(
        &self,
        params: &[f32],
        x: &[f32],
        n: usize,
        train: Option<Train<'_>>,
        keep_all: bool,
    ) -> Tape {
        let g = self.graph;
        let mut vals: Vec<Option<Vec<f32>>> = vec![None; g.shapes.len()];
        let mut saved: Vec<Saved> = Vec::with_capacity(g.calls.len());
        let last = self.last_reads();
        let keep = keep_all || train.is_some();
        for (ci, call) in g.calls.iter().enumerate() {
            let layer = &g.layers[call.layer];
            let ins: Vec<Vec<usize>> = call.inputs.iter().map(|&t| g.shapes[t].clone()).collect();
            let xs: Vec<&[f32]> = call
                .inputs
                .iter()
                .map(|&t| {
                    if t == g.input {
                        x
                    } else {
                        vals[t]
                            .as_deref()
                            .expect("inputs are computed before their readers")
                    }
                })
                .collect();
            let w = self.weights(call.layer, params);
            let cx = Ctx {
                n,
                ins: &ins,
                out: &g.shapes[call.output],
                w: &w,
                train: train.is_some(),
                trainable: layer.trainable,
                noise: train.and_then(|t| t.dropout).map(|d| Noise {
                    seed: d.seed,
                    stream: ci as u64,
                    first_sample: d.first_sample,
                }),
                sync: train.and_then(|t| t.sync),
            };
            let (y, s) = layer.op.forward(&cx, &xs);
            debug_assert_eq!(y.len(), n * g.shapes[call.output].iter().product::<usize>());
            vals[call.output] = Some(y);
            saved.push(if keep { s } else { None });
            if !keep {
                for &t in &call.inputs {
                    if last[t] == ci && t != g.output {
                        vals[t] = None;
                    }
                }
            }
        }
        Tape { vals, saved }
    }

    /// Moving-statistics sums of the calls that produced them, in call order.
    pub fn stats(&self, tape: &Tape) -> Vec<(usize, StatSums)> {
        self.graph
            .calls
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| {
                self.graph.layers[c.layer]
                    .op
                    .stat_sums(&tape.saved[ci])
                    .map(|s| (ci, s))
            })
            .collect()
    }

    /// Whether each tensor's gradient is needed: it depends on a weight
    /// that trains.
    fn requires_grad(&self) -> Vec<bool> {
        let g = self.graph;
        let mut req = vec![false; g.shapes.len()];
        for c in &g.calls {
            let l = &g.layers[c.layer];
            let own = l.trainable && l.decls.iter().any(|d| d.trainable);
            req[c.output] = own || c.inputs.iter().any(|&t| req[t]);
        }
        req
    }

    /// Backpropagates `dy` (the gradient w.r.t. the output, or w.r.t. the
    /// last call's pre-activation when `dy_is_preact`) and adds the weight
    /// gradients into `grad` (laid out like the parameters). `finished` is
    /// told each called layer as soon as its gradients are complete (after
    /// the backward pass of its first call), so they can be sent on while
    /// the rest of the pass runs.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        n: usize,
        mut tape: Tape,
        dy: Vec<f32>,
        dy_is_preact: bool,
        grad: &mut [f32],
        sync: Option<&dyn BatchSync>,
        finished: &mut dyn FnMut(usize, &mut [f32]),
    ) {
        let g = self.graph;
        let req = self.requires_grad();
        let mut first_call = vec![usize::MAX; g.layers.len()];
        let mut calls = vec![0usize; g.layers.len()];
        for (ci, c) in g.calls.iter().enumerate().rev() {
            first_call[c.layer] = ci;
            calls[c.layer] += 1;
        }
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; g.shapes.len()];
        grads[g.output] = Some(dy);
        let last_call = g.calls.iter().rposition(|c| c.output == g.output);
        for ci in (0..g.calls.len()).rev() {
            let layer_index = g.calls[ci].layer;
            self.backward_call(
                ci,
                params,
                x,
                n,
                &mut tape,
                &mut grads,
                &req,
                (dy_is_preact && Some(ci) == last_call, sync),
                (grad, calls[layer_index] == 1),
            );
            if first_call[layer_index] == ci {
                finished(layer_index, grad);
            }
        }
    }

    /// One call's backward pass: its input gradients into `grads`, its
    /// weight gradients added into `grad`.
    #[allow(clippy::too_many_arguments)]
    fn backward_call(
        &self,
        ci: usize,
        params: &[f32],
        x: &[f32],
        n: usize,
        tape: &mut Tape,
        grads: &mut [Option<Vec<f32>>],
        req: &[bool],
        (skip_act, sync): (bool, Option<&dyn BatchSync>),
        (grad, only_call): (&mut [f32], bool),
    ) {
        let g = self.graph;
        {
            let call = &g.calls[ci];
            let Some(dy) = grads[call.output].take() else {
                tape.vals[call.output] = None;
                return;
            };
            let layer = &g.layers[call.layer];
            let need: Vec<bool> = call
                .inputs
                .iter()
                .map(|&t| t != g.input && req[t])
                .collect();
            let trains = layer.trainable && layer.decls.iter().any(|d| d.trainable);
            if !trains && !need.iter().any(|&b| b) {
                tape.vals[call.output] = None;
                return;
            }
            // A layer called once whose weights all train writes its
            // gradients straight into the step's (zero until then); one
            // called again, or with statistics among its weights, into
            // zeroed buffers added after.
            let all_train = layer.params.iter().all(|&pi| self.specs[pi].trainable);
            let direct = if trains && only_call && all_train {
                let ranges: Vec<std::ops::Range<usize>> = layer
                    .params
                    .iter()
                    .map(|&pi| self.specs[pi].offset..self.specs[pi].offset + self.specs[pi].len)
                    .collect();
                disjoint_parts(grad, &ranges)
            } else {
                None
            };
            // Empty when the layer does not train or writes in place.
            let mut own: Vec<Vec<f32>> = if trains && direct.is_none() {
                layer
                    .decls
                    .iter()
                    .map(|d| vec![0.0; d.shape.iter().product()])
                    .collect()
            } else {
                Vec::new()
            };
            let ins: Vec<Vec<usize>> = call.inputs.iter().map(|&t| g.shapes[t].clone()).collect();
            let w = self.weights(call.layer, params);
            let y = tape.vals[call.output].take().unwrap_or_default();
            let saved = tape.saved[ci].take();
            let dxs = {
                let xs: Vec<&[f32]> = call
                    .inputs
                    .iter()
                    .map(|&t| {
                        if t == g.input {
                            x
                        } else {
                            tape.get(t).unwrap_or(&[])
                        }
                    })
                    .collect();
                let cx = Ctx {
                    n,
                    ins: &ins,
                    out: &g.shapes[call.output],
                    w: &w,
                    train: true,
                    trainable: layer.trainable,
                    noise: None,
                    sync,
                };
                let mut dw: Vec<&mut [f32]> = match direct {
                    Some(parts) => parts,
                    None => own.iter_mut().map(|v| v.as_mut_slice()).collect(),
                };
                layer.op.backward(
                    &cx,
                    Back {
                        xs: &xs,
                        y: &y,
                        saved: &saved,
                        dy,
                        need: &need,
                        dw: &mut dw,
                        skip_act,
                    },
                )
            };
            super::buffers::hand_back(y);
            for (d, &pi) in own.iter().zip(&layer.params) {
                let s = &self.specs[pi];
                if s.trainable {
                    grad[s.offset..s.offset + s.len]
                        .iter_mut()
                        .zip(d)
                        .for_each(|(g, v)| *g += v);
                }
            }
            for ((&t, dx), &needed) in call.inputs.iter().zip(dxs).zip(&need) {
                let Some(dx) = dx.filter(|_| needed) else {
                    continue;
                };
                grads[t] = Some(match grads[t].take() {
                    None => dx,
                    Some(mut acc) => {
                        acc.iter_mut().zip(&dx).for_each(|(a, d)| *a += d);
                        super::buffers::hand_back(dx);
                        acc
                    }
                });
            }
        }
    }
}

/// Disjoint parts of `buf`, one per range and in their order; None where
/// ranges overlap or pass its end.
fn disjoint_parts<'b>(
    buf: &'b mut [f32],
    ranges: &[std::ops::Range<usize>],
) -> Option<Vec<&'b mut [f32]>> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut parts: Vec<Option<&'b mut [f32]>> = (0..ranges.len()).map(|_| None).collect();
    let (mut rest, mut at) = (buf, 0usize);
    for i in order {
        let r = &ranges[i];
        let skip = r.start.checked_sub(at)?;
        if r.end < r.start || r.end - at > rest.len() {
            return None;
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (part, tail) = tail.split_at_mut(r.len());
        parts[i] = Some(part);
        rest = tail;
        at = r.end;
    }
    parts.into_iter().collect()
}
