//! Map operators: a map over the records of one chunk to a partial result,
//! and an associative combine. Datanodes run them next to the data; the
//! coordinator folds the partials in chunk order.
//!
//! Adding an operator means implementing [`MapOp`] and naming it in the
//! `operators!` list below; the scheduler and the wire protocol only ever
//! see encoded [`Task`]s and [`Partial`]s.

use crate::records::{RecordLayout, Records};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Debug;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("task: {0}")]
    Decode(String),
    #[error("{0}")]
    Records(#[from] crate::records::RecordError),
    #[error("partials of different operators cannot be combined ({0})")]
    Mismatch(String),
    #[error("{0}")]
    Invalid(String),
}

/// One map operator.
pub trait MapOp {
    type Partial: Serialize + DeserializeOwned + Clone + Debug + PartialEq;
    /// The partial result of one chunk's records.
    fn map(&self, records: &Records) -> Result<Self::Partial, OpError>;
    /// Associative: combine(combine(a, b), c) == combine(a, combine(b, c))
    /// up to floating-point rounding; callers fold in a fixed order.
    fn combine(&self, a: Self::Partial, b: Self::Partial) -> Self::Partial;
}

// ---------------------------------------------------------------- count

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Count;

impl MapOp for Count {
    type Partial = u64;
    fn map(&self, records: &Records) -> Result<u64, OpError> {
        Ok(records.len() as u64)
    }
    fn combine(&self, a: u64, b: u64) -> u64 {
        a + b
    }
}

// ---------------------------------------------------------------- feature statistics

/// Per-feature min, max, mean and M2 (sum of squared deviations).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureStats;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub n: u64,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Moments {
    fn empty() -> Moments {
        Moments {
            n: 0,
            min: Vec::new(),
            max: Vec::new(),
            mean: Vec::new(),
            m2: Vec::new(),
        }
    }

    /// Population standard deviation (numpy's default, sklearn's scaler).
    pub fn std(&self) -> Vec<f64> {
        self.m2
            .iter()
            .map(|m2| {
                if self.n == 0 {
                    0.0
                } else {
                    (m2 / self.n as f64).sqrt()
                }
            })
            .collect()
    }
}

impl MapOp for FeatureStats {
    type Partial = Moments;

    fn map(&self, records: &Records) -> Result<Moments, OpError> {
        let n = records.len();
        if n == 0 {
            return Ok(Moments::empty());
        }
        let f = records.layout().features();
        let mut x = vec![0f32; f];
        let mut min = vec![f32::INFINITY; f];
        let mut max = vec![f32::NEG_INFINITY; f];
        let mut sum = vec![0f64; f];
        for i in 0..n {
            records.features_into(i, &mut x);
            for j in 0..f {
                min[j] = min[j].min(x[j]);
                max[j] = max[j].max(x[j]);
                sum[j] += f64::from(x[j]);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
        // Second pass over the chunk: deviations from the chunk's own mean
        // keep M2 accurate where sum-of-squares would cancel.
        let mut m2 = vec![0f64; f];
        for i in 0..n {
            records.features_into(i, &mut x);
            for j in 0..f {
                let d = f64::from(x[j]) - mean[j];
                m2[j] += d * d;
            }
        }
        Ok(Moments {
            n: n as u64,
            min,
            max,
            mean,
            m2,
        })
    }

    /// Chan, Golub and LeVeque's pairwise merge.
    fn combine(&self, a: Moments, b: Moments) -> Moments {
        if a.n == 0 {
            return b;
        }
        if b.n == 0 {
            return a;
        }
        let n = a.n + b.n;
        let (na, nb, nf) = (a.n as f64, b.n as f64, n as f64);
        let mut mean = Vec::with_capacity(a.mean.len());
        let mut m2 = Vec::with_capacity(a.mean.len());
        for j in 0..a.mean.len() {
            let delta = b.mean[j] - a.mean[j];
            mean.push(a.mean[j] + delta * nb / nf);
            m2.push(a.m2[j] + b.m2[j] + delta * delta * na * nb / nf);
        }
        Moments {
            n,
            min: a.min.iter().zip(&b.min).map(|(x, y)| x.min(*y)).collect(),
            max: a.max.iter().zip(&b.max).map(|(x, y)| x.max(*y)).collect(),
            mean,
            m2,
        }
    }
}

// ---------------------------------------------------------------- labels

/// How many records carry each label.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelHistogram;

impl MapOp for LabelHistogram {
    type Partial = Vec<u64>;
    fn map(&self, records: &Records) -> Result<Vec<u64>, OpError> {
        let mut h: Vec<u64> = Vec::new();
        // Float targets have no classes to count.
        if !records.layout().classified() {
            return Ok(h);
        }
        for i in 0..records.len() {
            let l = records.label(i) as usize;
            if l >= 1 << 20 {
                return Err(OpError::Invalid(format!(
                    "record {i} has label {l}, beyond any plausible class count"
                )));
            }
            if h.len() <= l {
                h.resize(l + 1, 0);
            }
            h[l] += 1;
        }
        Ok(h)
    }
    fn combine(&self, mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
        if a.len() < b.len() {
            a.resize(b.len(), 0);
        }
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
        a
    }
}

// ---------------------------------------------------------------- the registry

macro_rules! operators {
    ($($variant:ident($op:ty),)*) => {
        /// Every operator a datanode will run.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        pub enum Operator {
            $($variant($op),)*
            /// Several operators in one pass over the data.
            Multi(Vec<Operator>),
        }

        /// A partial (or final) result of an [`Operator`].
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Partial {
            $($variant(<$op as MapOp>::Partial),)*
            Multi(Vec<Partial>),
        }

        impl Operator {
            pub fn map(&self, records: &Records) -> Result<Partial, OpError> {
                match self {
                    $(Operator::$variant(op) => Ok(Partial::$variant(op.map(records)?)),)*
                    Operator::Multi(ops) => ops
                        .iter()
                        .map(|o| o.map(records))
                        .collect::<Result<_, _>>()
                        .map(Partial::Multi),
                }
            }

            pub fn combine(&self, a: Partial, b: Partial) -> Result<Partial, OpError> {
                match (self, a, b) {
                    $((Operator::$variant(op), Partial::$variant(a), Partial::$variant(b)) => {
                        Ok(Partial::$variant(op.combine(a, b)))
                    })*
                    (Operator::Multi(ops), Partial::Multi(a), Partial::Multi(b))
                        if a.len() == ops.len() && b.len() == ops.len() =>
                    {
                        ops.iter()
                            .zip(a.into_iter().zip(b))
                            .map(|(o, (a, b))| o.combine(a, b))
                            .collect::<Result<_, _>>()
                            .map(Partial::Multi)
                    }
                    (op, a, _) => Err(OpError::Mismatch(format!(
                        "operator {} got {}",
                        op.name(),
                        a.name()
                    ))),
                }
            }

            pub fn name(&self) -> &'static str {
                match self {
                    $(Operator::$variant(_) => stringify!($variant),)*
                    Operator::Multi(_) => "Multi",
                }
            }
        }

        impl Partial {
            pub fn name(&self) -> &'static str {
                match self {
                    $(Partial::$variant(_) => stringify!($variant),)*
                    Partial::Multi(_) => "Multi",
                }
            }
        }
    };
}

operators! {
    Count(Count),
    FeatureStats(FeatureStats),
    LabelHistogram(LabelHistogram),
    Score(crate::train::ScoreOp),
    Predict(crate::train::PredictOp),
}

impl Operator {
    /// Folds partials in the order given (chunk order, for determinism).
    pub fn fold(&self, partials: impl IntoIterator<Item = Partial>) -> Result<Partial, OpError> {
        let mut it = partials.into_iter();
        let first = it
            .next()
            .ok_or_else(|| OpError::Invalid("no partial results to combine".into()))?;
        it.try_fold(first, |acc, p| self.combine(acc, p))
    }
}

// ---------------------------------------------------------------- on the wire

/// What a datanode receives: the records' layout and the operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub layout: RecordLayout,
    pub op: Operator,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 64 << 20 }>()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, OpError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| OpError::Decode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, OpError> {
    let (v, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| OpError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(OpError::Decode(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(v)
}

/// Runs an encoded task over one chunk's bytes; returns the encoded partial.
pub fn run_encoded(task: &[u8], chunk: &[u8]) -> Result<Vec<u8>, OpError> {
    run(&decode(task)?, chunk)
}

/// Runs a decoded task over one chunk's bytes; returns the encoded partial.
pub fn run(task: &Task, chunk: &[u8]) -> Result<Vec<u8>, OpError> {
    let records = task.layout.view("chunk", chunk)?;
    encode(&task.op.map(&records)?)
}

// ---------------------------------------------------------------- dataset statistics

/// What `quern dataset stats` stores in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    pub count: u64,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub label_counts: Vec<u64>,
}

impl DatasetStats {
    /// The one-pass job that computes everything here.
    pub fn operator() -> Operator {
        Operator::Multi(vec![
            Operator::Count(Count),
            Operator::FeatureStats(FeatureStats),
            Operator::LabelHistogram(LabelHistogram),
        ])
    }

    pub fn from_partial(p: Partial) -> Result<DatasetStats, OpError> {
        match p {
            Partial::Multi(v) => match <[Partial; 3]>::try_from(v) {
                Ok(
                    [Partial::Count(count), Partial::FeatureStats(m), Partial::LabelHistogram(h)],
                ) => Ok(DatasetStats {
                    count,
                    std: m.std(),
                    min: m.min,
                    max: m.max,
                    mean: m.mean,
                    label_counts: h,
                }),
                _ => Err(OpError::Mismatch("not a dataset statistics result".into())),
            },
            other => Err(OpError::Mismatch(format!(
                "{} is not a dataset statistics result",
                other.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{encode_record, DType};

    fn data(n: usize) -> (RecordLayout, Vec<u8>, Vec<[f32; 3]>) {
        let l = RecordLayout::new(vec![3], DType::F32, DType::U8).unwrap();
        let mut b = Vec::new();
        let mut rows = Vec::new();
        for i in 0..n {
            let f = [i as f32 * 0.5 + 1e4, (i % 7) as f32, -(i as f32).sqrt()];
            encode_record(&l, &f, (i % 4) as f64, &mut b);
            rows.push(f);
        }
        (l, b, rows)
    }

    #[test]
    fn chunked_statistics_match_a_direct_computation() {
        let (l, b, rows) = data(1000);
        let op = DatasetStats::operator();
        let rs = l.record_size();
        let partials: Vec<Partial> = [0..137, 137..500, 500..501, 501..1000]
            .into_iter()
            .map(|r| {
                let v = l.view("t", &b[r.start * rs..r.end * rs]).unwrap();
                op.map(&v).unwrap()
            })
            .collect();
        let s = DatasetStats::from_partial(op.fold(partials).unwrap()).unwrap();
        assert_eq!(s.count, 1000);
        assert_eq!(s.label_counts, vec![250; 4]);
        for j in 0..3 {
            let col: Vec<f64> = rows.iter().map(|r| f64::from(r[j])).collect();
            let mean = col.iter().sum::<f64>() / 1000.0;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 1000.0;
            assert!((s.mean[j] - mean).abs() <= 1e-9 * mean.abs().max(1.0));
            assert!((s.std[j] - var.sqrt()).abs() <= 1e-9 * var.sqrt().max(1.0));
            let min = rows.iter().map(|r| r[j]).fold(f32::INFINITY, f32::min);
            assert_eq!(s.min[j], min);
        }
    }

    #[test]
    fn tasks_round_trip_through_bytes() {
        let (l, b, _) = data(10);
        let task = encode(&Task {
            layout: l.clone(),
            op: Operator::Count(Count),
        })
        .unwrap();
        let out: Partial = decode(&run_encoded(&task, &b).unwrap()).unwrap();
        assert_eq!(out, Partial::Count(10));
        assert!(run_encoded(&task, &b[1..]).is_err());
        assert!(run_encoded(&task[1..], &b).is_err());
    }
}
