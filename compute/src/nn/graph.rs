//! Keras model configs (`to_json()`, a `.keras` file's `config.json`) to a
//! graph of layer calls in topological order.
//!
//! Functional models may branch and merge, call a layer several times
//! (shared weights), and hold other models as layers (nested Sequential or
//! Functional models are inlined, their layers keeping one set of weights
//! however often the model is called). Every problem found on the way, in
//! any layer, is collected so that one error lists them all.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::config::{Cfg, Problem};
use super::error::{NnError, Result};
use super::layers::{self, shape_str, Op, ParamDecl};

/// One layer object: its weights are shared by all of its calls.
#[derive(Debug)]
pub(crate) struct LayerDef {
    pub name: String,
    pub class: String,
    pub op: Box<dyn Op>,
    /// `trainable: false` in the config, or inside a frozen nested model.
    pub trainable: bool,
    /// Where Keras 3 keeps its variables in `model.weights.h5`.
    pub h5_path: String,
    /// The weights declared at the first call.
    pub decls: Vec<ParamDecl>,
    /// Indices of its weights in the model's parameter specs.
    pub params: Vec<usize>,
}

/// One call of a layer: tensors in, one tensor out.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub layer: usize,
    pub inputs: Vec<usize>,
    pub output: usize,
}

/// A row of `model.summary()`: a top-level layer (a nested model is one
/// row).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub name: String,
    pub class: String,
    pub output_shape: Option<Vec<usize>>,
    /// Indices of the leaf layers whose weights it owns.
    pub layers: Vec<usize>,
    /// `name[node][tensor]` of each input of each call.
    pub connected: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct Graph {
    pub name: String,
    pub layers: Vec<LayerDef>,
    /// In topological order.
    pub calls: Vec<Call>,
    /// Per-sample shape of each tensor.
    pub shapes: Vec<Vec<usize>>,
    pub input: usize,
    pub output: usize,
    pub rows: Vec<Row>,
    /// A Sequential model (its summary has no "Connected to" column).
    pub sequential: bool,
}

/// A reference to a tensor inside one model's config.
type Ref = (String, usize, usize);

enum Node {
    /// A call of a leaf layer.
    Leaf { layer: usize, args: Vec<Ref> },
    /// A call of a nested model.
    Nested { model: usize, args: Vec<Ref> },
}

/// One model's config, before it is called.
struct Template {
    name: String,
    inputs: Vec<(String, Option<Vec<usize>>)>,
    outputs: Vec<Ref>,
    /// (layer name, node) in config order; node index = position among
    /// that layer's nodes.
    nodes: Vec<(String, Node)>,
    /// Top-level entries: (name, class, leaf layers or nested model).
    entries: Vec<(String, String, Entry)>,
    sequential: bool,
}

#[derive(Clone, Copy)]
enum Entry {
    Input,
    Leaf(usize),
    Nested(usize),
}

struct Builder {
    layers: Vec<Option<LayerDef>>,
    templates: Vec<Template>,
    problems: Vec<Problem>,
    calls: Vec<Call>,
    /// None for a tensor whose shape could not be computed.
    shapes: Vec<Option<Vec<usize>>>,
    /// First-call output shape per leaf layer.
    first_out: HashMap<usize, Vec<usize>>,
}

/// Parses a model config and resolves every shape.
pub(crate) fn parse(text: &str) -> Result<Graph> {
    let root: Value = serde_json::from_str(text).map_err(|e| NnError::Json(e.to_string()))?;
    if !root.is_object() {
        return Err(NnError::Json("the top level is not an object".into()));
    }
    let mut b = Builder {
        layers: Vec::new(),
        templates: Vec::new(),
        problems: Vec::new(),
        calls: Vec::new(),
        shapes: Vec::new(),
        first_out: HashMap::new(),
    };
    let top = b.template(&root, "", true)?;
    let t = &b.templates[top];
    let sequential = t.sequential;
    let name = t.name.clone();
    if t.inputs.len() != 1 || t.outputs.len() != 1 {
        return Err(NnError::Model(format!(
            "the model has {} inputs and {} outputs; quern trains and runs models with one input \
             and one output (join inputs with Concatenate, or split the model)",
            t.inputs.len(),
            t.outputs.len()
        )));
    }
    let shape = t.inputs[0].1.clone().ok_or_else(|| {
        NnError::Model(format!(
            "the model's input `{}` has no shape (no batch_shape or build_input_shape)",
            t.inputs[0].0
        ))
    })?;
    let input = b.tensor(Some(shape));
    let outputs = b.instantiate(top, &[input], true);
    let mut rows = Vec::new();
    b.rows(top, &mut rows);
    if !b.problems.is_empty() {
        return Err(NnError::Unsupported(b.problems));
    }
    let output = outputs
        .and_then(|o| o.first().copied())
        .ok_or_else(|| NnError::Model("the model's output could not be computed".into()))?;
    let mut layers = Vec::new();
    let mut remap = vec![usize::MAX; b.layers.len()];
    for (i, l) in b.layers.into_iter().enumerate() {
        if let Some(l) = l {
            remap[i] = layers.len();
            layers.push(l);
        }
    }
    let calls = b
        .calls
        .into_iter()
        .map(|c| Call {
            layer: remap[c.layer],
            ..c
        })
        .collect();
    for r in &mut rows {
        r.layers = r
            .layers
            .iter()
            .map(|&i| remap[i])
            .filter(|&i| i != usize::MAX)
            .collect();
    }
    Ok(Graph {
        name,
        layers,
        calls,
        shapes: b
            .shapes
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
        input,
        output,
        rows,
        sequential,
    })
}

fn obj<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| NnError::Json(format!("{what} is not an object")))
}

/// `[null, 28, 28, 1]` -> `[28, 28, 1]`.
fn shape_of(v: &Value) -> std::result::Result<Vec<usize>, String> {
    let arr = v.as_array().ok_or("not a list")?;
    if arr.is_empty() {
        return Err("empty shape".into());
    }
    if !arr[0].is_null() {
        return Err("the batch dimension must be None".into());
    }
    arr[1..]
        .iter()
        .map(|d| {
            d.as_u64()
                .filter(|&d| d > 0)
                .map(|d| d as usize)
                .ok_or_else(|| format!("dimension {d} is not a positive integer (variable sizes are not supported)"))
        })
        .collect()
}

/// A layer's declared input shape (Keras 2 first layers, Keras 3
/// InputLayers), if any.
fn declared_shape(
    cfg: &Map<String, Value>,
    layer: &Map<String, Value>,
) -> Option<std::result::Result<Vec<usize>, String>> {
    for key in ["batch_shape", "batch_input_shape"] {
        if let Some(v) = cfg.get(key).filter(|v| !v.is_null()) {
            return Some(shape_of(v));
        }
    }
    layer
        .get("build_config")
        .and_then(|b| b.get("input_shape"))
        .filter(|v| !v.is_null())
        .map(shape_of)
}

/// Tensor references in a node's arguments, in order.
fn collect_refs(v: &Value, out: &mut Vec<Ref>) {
    match v {
        Value::Object(m) => {
            // Keras 3: {"config": {"keras_history": ["name", 0, 0]}}
            if let Some(h) = m.get("keras_history").and_then(Value::as_array) {
                if let Some(r) = history(h) {
                    out.push(r);
                }
                return;
            }
            for v in m.values() {
                collect_refs(v, out);
            }
        }
        Value::Array(a) => {
            // Keras 2: ["name", 0, 0, {}]
            if let Some(r) = history(a) {
                out.push(r);
                return;
            }
            for v in a {
                collect_refs(v, out);
            }
        }
        _ => {}
    }
}

fn history(a: &[Value]) -> Option<Ref> {
    match a {
        [Value::String(n), i, t, ..] => {
            Some((n.clone(), i.as_u64()? as usize, t.as_u64()? as usize))
        }
        _ => None,
    }
}

/// `[["in", 0, 0], ...]` or a single `["in", 0, 0]`.
fn refs_list(v: Option<&Value>) -> Vec<Ref> {
    match v.and_then(Value::as_array) {
        Some(a) => match history(a) {
            Some(r) => vec![r],
            None => a
                .iter()
                .filter_map(|x| x.as_array().and_then(|x| history(x)))
                .collect(),
        },
        None => Vec::new(),
    }
}

impl Builder {
    fn tensor(&mut self, shape: Option<Vec<usize>>) -> usize {
        self.shapes.push(shape);
        self.shapes.len() - 1
    }

    /// Reads a model config (top level or nested) into a template.
    fn template(&mut self, v: &Value, prefix: &str, trainable: bool) -> Result<usize> {
        let root = obj(v, "the model")?;
        let class = root
            .get("class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| NnError::Json("no \"class_name\" at the top level".into()))?;
        let sequential = match class {
            "Sequential" => true,
            "Functional" | "Model" => false,
            other => {
                return Err(NnError::Model(format!(
                    "model class {other} is not supported (supported: Sequential, Functional); \
                     subclassed models cannot be imported, rebuild them functionally"
                )))
            }
        };
        let config = root
            .get("config")
            .and_then(Value::as_object)
            .ok_or_else(|| NnError::Json("no \"config\" object in the model".into()))?;
        let name = config
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(if sequential {
                "sequential"
            } else {
                "functional"
            })
            .to_string();
        let trainable = trainable
            && config
                .get("trainable")
                .and_then(Value::as_bool)
                .unwrap_or(true);
        let list = config
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| NnError::Json("no \"config.layers\" list".into()))?;
        let mut t = Template {
            name: name.clone(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            nodes: Vec::new(),
            entries: Vec::new(),
            sequential,
        };
        let mut previous: Option<String> = None;
        // Keras 3 files each layer's variables under a name made from its
        // class, numbered in the container's order (`conv2d`, `conv2d_1`),
        // not under the layer's own name.
        let mut used: HashMap<String, usize> = HashMap::new();
        let mut h5_name = |class: &str| {
            let base = snake_case(if class == "Model" {
                "Functional"
            } else {
                class
            });
            match used.get_mut(&base) {
                Some(k) => {
                    *k += 1;
                    format!("{base}_{k}")
                }
                None => {
                    used.insert(base.clone(), 0);
                    base
                }
            }
        };
        for (i, lv) in list.iter().enumerate() {
            let lo = obj(lv, &format!("layer {i} of {name}"))?;
            let lclass = lo
                .get("class_name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    NnError::Json(format!("layer {i} of {name} has no \"class_name\""))
                })?;
            let lcfg = lo.get("config").and_then(Value::as_object).ok_or_else(|| {
                NnError::Json(format!("layer {i} ({lclass}) of {name} has no \"config\""))
            })?;
            let lname = lcfg
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("layer_{i}"));
            // Only an input (an InputLayer, or a Sequential's first layer)
            // declares the model's shape; other layers' build shapes are
            // recomputed.
            let declares = lclass == "InputLayer" || (sequential && previous.is_none());
            let shape = declares.then(|| declared_shape(lcfg, lo)).flatten();
            let shape = match shape {
                Some(Ok(s)) => Some(s),
                Some(Err(m)) => {
                    self.problems.push(Problem {
                        layer: lname.clone(),
                        class: lclass.to_string(),
                        message: format!("input shape: {m}"),
                    });
                    None
                }
                None => None,
            };
            if lclass == "InputLayer" {
                t.entries
                    .push((lname.clone(), lclass.to_string(), Entry::Input));
                if sequential {
                    t.inputs.push((lname.clone(), shape));
                    previous = Some(lname);
                } else {
                    t.inputs.push((lname, shape));
                }
                continue;
            }
            // The args of each call of this layer.
            let calls: Vec<Vec<Ref>> = if sequential {
                if previous.is_none() {
                    // A Sequential without an InputLayer: the first layer's
                    // shape (Keras 2) or the model's build shape.
                    let s = shape.or_else(|| {
                        config
                            .get("build_input_shape")
                            .or_else(|| root.get("build_config").and_then(|b| b.get("input_shape")))
                            .and_then(|v| shape_of(v).ok())
                    });
                    let input = format!("{name}_input");
                    t.inputs.push((input.clone(), s));
                    previous = Some(input);
                }
                let prev = previous.clone().unwrap_or_default();
                vec![vec![(prev, 0, 0)]]
            } else {
                lo.get("inbound_nodes")
                    .and_then(Value::as_array)
                    .map(|nodes| {
                        nodes
                            .iter()
                            .map(|n| {
                                let mut refs = Vec::new();
                                // Keras 3 keeps tensors under "args"; kwargs
                                // (training flags, masks) are not inputs.
                                collect_refs(n.get("args").unwrap_or(n), &mut refs);
                                refs
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let stored = h5_name(lclass);
            let entry = match lclass {
                "Sequential" | "Functional" | "Model" => {
                    let path = format!("{prefix}layers/{stored}/");
                    let m = self.template(lv, &path, trainable)?;
                    for args in calls {
                        t.nodes
                            .push((lname.clone(), Node::Nested { model: m, args }));
                    }
                    Entry::Nested(m)
                }
                _ => {
                    let cfg = Cfg {
                        layer: &lname,
                        class: lclass,
                        map: lcfg,
                    };
                    let layer_trainable = match cfg.bool("trainable", true) {
                        Ok(b) => b,
                        Err(p) => {
                            self.problems.push(p);
                            true
                        }
                    };
                    let op = layers::build(&cfg);
                    let def = match op {
                        Ok(op) => Some(LayerDef {
                            name: lname.clone(),
                            class: lclass.to_string(),
                            op,
                            trainable: trainable && layer_trainable,
                            h5_path: format!("{prefix}layers/{stored}/vars"),
                            decls: Vec::new(),
                            params: Vec::new(),
                        }),
                        Err(p) => {
                            self.problems.push(p);
                            None
                        }
                    };
                    self.layers.push(def);
                    let li = self.layers.len() - 1;
                    for args in calls {
                        t.nodes
                            .push((lname.clone(), Node::Leaf { layer: li, args }));
                    }
                    Entry::Leaf(li)
                }
            };
            t.entries.push((lname.clone(), lclass.to_string(), entry));
            previous = Some(lname);
        }
        if sequential {
            if let Some(p) = previous {
                t.outputs = vec![(p, 0, 0)];
            }
        } else {
            // Older configs may omit input_layers and output_layers: then the
            // InputLayers, in order, and the last layer's last call.
            let ins = refs_list(config.get("input_layers"));
            if !ins.is_empty() {
                let shapes: HashMap<String, Option<Vec<usize>>> = t.inputs.drain(..).collect();
                t.inputs = ins
                    .into_iter()
                    .map(|(n, _, _)| {
                        let s = shapes.get(&n).cloned().flatten();
                        (n, s)
                    })
                    .collect();
            }
            t.outputs = refs_list(config.get("output_layers"));
            if t.outputs.is_empty() {
                if let Some((name, _)) = t.nodes.last() {
                    let k = t.nodes.iter().filter(|(n, _)| n == name).count();
                    t.outputs = vec![(name.clone(), k - 1, 0)];
                }
            }
        }
        if t.entries.iter().all(|(_, _, e)| matches!(e, Entry::Input)) {
            return Err(NnError::Model(format!("the model {name} has no layers")));
        }
        self.templates.push(t);
        Ok(self.templates.len() - 1)
    }

    /// Emits the calls of template `m` applied to `inputs`; returns its
    /// output tensors (None when a problem stopped them).
    fn instantiate(&mut self, m: usize, inputs: &[usize], top: bool) -> Option<Vec<usize>> {
        let (tname, tinputs) = {
            let t = &self.templates[m];
            (t.name.clone(), t.inputs.clone())
        };
        if tinputs.len() != inputs.len() {
            self.problems.push(Problem {
                layer: tname,
                class: "Functional".into(),
                message: format!(
                    "called with {} inputs, takes {}",
                    inputs.len(),
                    tinputs.len()
                ),
            });
            return None;
        }
        let mut known: HashMap<Ref, Option<usize>> = HashMap::new();
        for ((name, declared), &t) in tinputs.iter().zip(inputs) {
            if let (Some(d), Some(actual)) = (declared, self.shapes[t].clone()) {
                if !top && *d != actual {
                    self.problems.push(Problem {
                        layer: name.clone(),
                        class: "InputLayer".into(),
                        message: format!(
                            "declares {} but is given {}",
                            shape_str(d),
                            shape_str(&actual)
                        ),
                    });
                }
            }
            known.insert((name.clone(), 0, 0), Some(t));
        }
        // Node index of each node: its position among its layer's nodes.
        let count = self.templates[m].nodes.len();
        let mut index = Vec::with_capacity(count);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (name, _) in &self.templates[m].nodes {
            let k = seen.entry(name.clone()).or_insert(0);
            index.push(*k);
            *k += 1;
        }
        let mut done = vec![false; count];
        let mut remaining = count;
        while remaining > 0 {
            let mut progressed = false;
            for ni in 0..count {
                if done[ni] {
                    continue;
                }
                let (name, args, target) = match &self.templates[m].nodes[ni] {
                    (n, Node::Leaf { layer, args }) => {
                        (n.clone(), args.clone(), Entry::Leaf(*layer))
                    }
                    (n, Node::Nested { model, args }) => {
                        (n.clone(), args.clone(), Entry::Nested(*model))
                    }
                };
                if !args.iter().all(|r| known.contains_key(r)) {
                    continue;
                }
                done[ni] = true;
                remaining -= 1;
                progressed = true;
                let ins: Option<Vec<usize>> = args.iter().map(|r| known[r]).collect();
                let outs = match ins {
                    None => None,
                    Some(ins) => match target {
                        Entry::Leaf(li) => self.call(li, &ins).map(|t| vec![t]),
                        Entry::Nested(mi) => self.instantiate(mi, &ins, false),
                        Entry::Input => None,
                    },
                };
                match outs {
                    Some(outs) => {
                        for (ti, t) in outs.into_iter().enumerate() {
                            known.insert((name.clone(), index[ni], ti), Some(t));
                        }
                    }
                    None => {
                        known.insert((name.clone(), index[ni], 0), None);
                    }
                }
            }
            if !progressed {
                let stuck: Vec<String> = (0..count)
                    .filter(|&i| !done[i])
                    .map(|i| self.templates[m].nodes[i].0.clone())
                    .collect();
                self.problems.push(Problem {
                    layer: tname.clone(),
                    class: "Functional".into(),
                    message: format!(
                        "layers {} take tensors that no layer produces (a cycle, or a reference to \
                         a missing layer)",
                        stuck.join(", ")
                    ),
                });
                return None;
            }
        }
        let outputs = self.templates[m].outputs.clone();
        let mut out = Vec::new();
        for r in &outputs {
            match known.get(r) {
                Some(Some(t)) => out.push(*t),
                Some(None) => return None,
                None => {
                    self.problems.push(Problem {
                        layer: tname.clone(),
                        class: "Functional".into(),
                        message: format!(
                            "output {}[{}][{}] is not produced by any layer",
                            r.0, r.1, r.2
                        ),
                    });
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Emits one call of leaf layer `li`.
    fn call(&mut self, li: usize, ins: &[usize]) -> Option<usize> {
        let shapes: Option<Vec<Vec<usize>>> = ins.iter().map(|&t| self.shapes[t].clone()).collect();
        let shapes = shapes?;
        let def = self.layers[li].as_mut()?;
        if !def.op.merges() && shapes.len() != 1 {
            self.problems.push(Problem {
                layer: def.name.clone(),
                class: def.class.clone(),
                message: format!("takes one input, is given {}", shapes.len()),
            });
            return None;
        }
        match def.op.out_shape(&shapes) {
            Ok(out) => {
                if layers::size(&out) > u32::MAX as usize || out.contains(&0) {
                    self.problems.push(Problem {
                        layer: def.name.clone(),
                        class: def.class.clone(),
                        message: format!("output shape {} is empty or too large", shape_str(&out)),
                    });
                    return None;
                }
                if let Some(first) = self.first_out.get(&li) {
                    // A shared layer: later calls must fit the weights.
                    let decls = def.op.params(&shapes);
                    if decls
                        .iter()
                        .map(|d| &d.shape)
                        .ne(def.decls.iter().map(|d| &d.shape))
                    {
                        self.problems.push(Problem {
                            layer: def.name.clone(),
                            class: def.class.clone(),
                            message: format!(
                                "is called again on {} whose weights do not fit the first call's (output {})",
                                shapes.iter().map(|s| shape_str(s)).collect::<Vec<_>>().join(", "),
                                shape_str(first)
                            ),
                        });
                        return None;
                    }
                } else {
                    def.decls = def.op.params(&shapes);
                    self.first_out.insert(li, out.clone());
                }
                let t = self.tensor(Some(out));
                self.calls.push(Call {
                    layer: li,
                    inputs: ins.to_vec(),
                    output: t,
                });
                Some(t)
            }
            Err(m) => {
                self.problems.push(Problem {
                    layer: def.name.clone(),
                    class: def.class.clone(),
                    message: m,
                });
                None
            }
        }
    }

    /// Summary rows of template `m`'s top-level entries.
    fn rows(&self, m: usize, out: &mut Vec<Row>) {
        let t = &self.templates[m];
        for (name, class, entry) in &t.entries {
            let mut connected = Vec::new();
            for (n, node) in &t.nodes {
                if n == name {
                    let args = match node {
                        Node::Leaf { args, .. } | Node::Nested { args, .. } => args,
                    };
                    connected.extend(args.iter().map(|(a, i, k)| format!("{a}[{i}][{k}]")));
                }
            }
            let (layers, output_shape) = match *entry {
                Entry::Input => (
                    Vec::new(),
                    t.inputs
                        .iter()
                        .find(|(n, _)| n == name)
                        .and_then(|(_, s)| s.clone()),
                ),
                Entry::Leaf(li) => (vec![li], self.first_out.get(&li).cloned()),
                Entry::Nested(mi) => {
                    let mut leaves = Vec::new();
                    self.leaves(mi, &mut leaves);
                    let last =
                        self.templates[mi]
                            .entries
                            .iter()
                            .rev()
                            .find_map(|(_, _, e)| match e {
                                Entry::Leaf(li) => self.first_out.get(li).cloned(),
                                _ => None,
                            });
                    (leaves, last)
                }
            };
            out.push(Row {
                name: name.clone(),
                class: class.clone(),
                output_shape,
                layers,
                connected,
            });
        }
    }

    fn leaves(&self, m: usize, out: &mut Vec<usize>) {
        for (_, _, e) in &self.templates[m].entries {
            match *e {
                Entry::Leaf(li) => out.push(li),
                Entry::Nested(mi) => self.leaves(mi, out),
                Entry::Input => {}
            }
        }
    }
}

/// Keras's `naming.to_snake_case` of a class name: `Conv2DTranspose` ->
/// `conv2d_transpose`, `ReLU` -> `re_lu`.
pub(crate) fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    // (.)([A-Z][a-z]+) -> \1_\2
    let mut a = Vec::with_capacity(chars.len() + 4);
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i + 2 < chars.len() + 1
            && chars.get(i + 1).is_some_and(|c| c.is_ascii_uppercase())
            && chars.get(i + 2).is_some_and(|c| c.is_ascii_lowercase());
        if starts_word {
            a.push(chars[i]);
            a.push('_');
            a.push(chars[i + 1]);
            let mut j = i + 2;
            while j < chars.len() && chars[j].is_ascii_lowercase() {
                a.push(chars[j]);
                j += 1;
            }
            i = j;
        } else {
            a.push(chars[i]);
            i += 1;
        }
    }
    // ([a-z])([A-Z]) -> \1_\2
    let mut out = String::with_capacity(a.len() + 4);
    let mut i = 0;
    while i < a.len() {
        if a[i].is_ascii_lowercase() && a.get(i + 1).is_some_and(|c| c.is_ascii_uppercase()) {
            out.push(a[i]);
            out.push('_');
            out.push(a[i + 1]);
            i += 2;
        } else {
            out.push(a[i]);
            i += 1;
        }
    }
    out.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::snake_case;

    #[test]
    fn class_names_snake_case_as_keras_does() {
        for (class, want) in [
            ("Conv2D", "conv2d"),
            ("Conv2DTranspose", "conv2d_transpose"),
            ("BatchNormalization", "batch_normalization"),
            ("ReLU", "re_lu"),
            ("PReLU", "p_re_lu"),
            ("GlobalAveragePooling2D", "global_average_pooling2d"),
            ("DepthwiseConv2D", "depthwise_conv2d"),
            ("InputLayer", "input_layer"),
            ("LayerScale", "layer_scale"),
            ("Dense", "dense"),
            ("Functional", "functional"),
            ("ELU", "elu"),
            ("LeakyReLU", "leaky_re_lu"),
            ("UpSampling2D", "up_sampling2d"),
            ("SeparableConv2D", "separable_conv2d"),
        ] {
            assert_eq!(snake_case(class), want, "{class}");
        }
    }
}
