//! `quern._quern`: the client library for Python. Every call releases the
//! GIL while it waits on the cluster, and every error becomes the Python
//! exception a user of files expects, with the CLI's text.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyPermissionError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use quern_client::TrainOptions;
use quern_client::{Client as Inner, Dataset, Error, ImportOptions, JobOptions, WriteOptions};
use quern_compute::nn::{Model, OptimizerConfig, Sgd};
use quern_compute::records::{DType, Encoded, RecordLayout};
use quern_compute::train::{f32s_from_le, Objective, ScaleKind, Scaler};
use quern_proto::msg::{FileKind, LocatedChunk};
use quern_proto::ErrorCode;
use std::future::Future;
use std::sync::OnceLock;
use tokio::io::AsyncReadExt;

create_exception!(
    _quern,
    QuernError,
    PyException,
    "Anything quern reports that is not a missing, existing, forbidden or directory path."
);

fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("quern")
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| QuernError::new_err(format!("cannot start quern's async runtime: {e}")))
}

/// The exception for a client error: the CLI's message, the type Python
/// code catches for that kind of failure.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e.code() {
        Some(ErrorCode::NotFound) => PyFileNotFoundError::new_err(msg),
        Some(ErrorCode::AlreadyExists) => PyFileExistsError::new_err(msg),
        Some(ErrorCode::PermissionDenied) => PyPermissionError::new_err(msg),
        Some(ErrorCode::IsADirectory) => PyIsADirectoryError::new_err(msg),
        _ => QuernError::new_err(msg),
    }
}

/// Runs `f` on the runtime with the GIL released.
fn block<T: Send>(py: Python<'_>, f: impl Future<Output = Result<T, Error>> + Send) -> PyResult<T> {
    let rt = runtime()?;
    py.allow_threads(|| rt.block_on(f)).map_err(py_err)
}

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| QuernError::new_err(e.to_string()))
}

fn io_err(context: String, cause: std::io::Error) -> Error {
    Error::Io { context, cause }
}

/// A connection to a cluster (`quern.connect`).
#[pyclass(module = "quern._quern", frozen)]
struct Client {
    inner: Inner,
}

/// Connects with the client configuration the CLI would use: `config`,
/// else `$QUERN_CONFIG`, else `~/.config/quern/client.toml`.
#[pyfunction]
#[pyo3(signature = (config=None))]
fn connect(py: Python<'_>, config: Option<std::path::PathBuf>) -> PyResult<Client> {
    let cfg = quern_proto::config::ClientConfig::discover(config.as_deref())
        .map_err(|e| QuernError::new_err(e.to_string()))?;
    let rt = runtime()?;
    let inner = py
        .allow_threads(|| {
            let _entered = rt.enter();
            Inner::from_config(&cfg)
        })
        .map_err(py_err)?;
    Ok(Client { inner })
}

#[pymethods]
impl Client {
    /// Stores local file `local` as `remote` (into it, when `remote` is a
    /// directory); returns the stored file's status as JSON.
    #[pyo3(signature = (local, remote, replication=None, chunk_size=None, overwrite=false))]
    fn put(
        &self,
        py: Python<'_>,
        local: std::path::PathBuf,
        remote: String,
        replication: Option<u8>,
        chunk_size: Option<u64>,
        overwrite: bool,
    ) -> PyResult<String> {
        let c = self.inner.clone();
        let status = block(py, async move {
            let mut target = remote.clone();
            if let Some(s) = c.try_stat(&remote).await? {
                if s.kind == FileKind::Dir {
                    let name = local
                        .file_name()
                        .and_then(|n| n.to_str())
                        .ok_or_else(|| Error::Job(format!("{}: no file name", local.display())))?;
                    target = format!("{}/{name}", remote.trim_end_matches('/'));
                }
            }
            let mut input = tokio::fs::File::open(&local)
                .await
                .map_err(|e| io_err(format!("put: {}", local.display()), e))?;
            let mut w = c
                .create(&target, write_options(replication, chunk_size, overwrite))
                .await?;
            let mut buf = vec![0u8; 4 << 20];
            loop {
                let n = match input.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        w.abort().await;
                        return Err(io_err(format!("put: reading {}", local.display()), e));
                    }
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = w.write(&buf[..n]).await {
                    w.abort().await;
                    return Err(e);
                }
            }
            w.close().await
        })?;
        json(&status)
    }

    /// Fetches `remote` into local file `local` (replacing it).
    fn get(&self, py: Python<'_>, remote: String, local: std::path::PathBuf) -> PyResult<u64> {
        let c = self.inner.clone();
        let path = remote.clone();
        if block(py, async move { c.stat(&path).await })?.kind == FileKind::Dir {
            return Err(PyIsADirectoryError::new_err(format!(
                "get: {remote} is a directory; get fetches files"
            )));
        }
        let c = self.inner.clone();
        block(py, async move {
            let mut out = tokio::fs::File::create(&local)
                .await
                .map_err(|e| io_err(format!("get: {}", local.display()), e))?;
            c.read_to(&remote, &mut out, |_| {}).await
        })
    }

    /// The entries of a directory (or a file's own status), as JSON.
    fn ls(&self, py: Python<'_>, path: String) -> PyResult<String> {
        let c = self.inner.clone();
        json(&block(py, async move { c.list(&path).await })?)
    }

    fn stat(&self, py: Python<'_>, path: String) -> PyResult<String> {
        let c = self.inner.clone();
        json(&block(py, async move { c.stat(&path).await })?)
    }

    #[pyo3(signature = (path, parents=true))]
    fn mkdir(&self, py: Python<'_>, path: String, parents: bool) -> PyResult<()> {
        let c = self.inner.clone();
        block(py, async move { c.mkdir(&path, parents).await })
    }

    #[pyo3(signature = (path, recursive=false))]
    fn rm(&self, py: Python<'_>, path: String, recursive: bool) -> PyResult<()> {
        let c = self.inner.clone();
        block(py, async move { c.delete(&path, recursive).await })
    }

    #[pyo3(signature = (src, dst, replace=false))]
    fn mv(&self, py: Python<'_>, src: String, dst: String, replace: bool) -> PyResult<()> {
        let c = self.inner.clone();
        block(py, async move { c.rename(&src, &dst, replace).await })
    }

    /// The cluster as `quern report` shows it, as JSON.
    fn report(&self, py: Python<'_>) -> PyResult<String> {
        let c = self.inner.clone();
        json(&block(py, async move { c.report().await })?)
    }

    fn fsck(&self, py: Python<'_>, path: String) -> PyResult<String> {
        let c = self.inner.clone();
        json(&block(py, async move { c.fsck(&path).await })?)
    }

    fn locate(&self, py: Python<'_>, path: String) -> PyResult<String> {
        let c = self.inner.clone();
        json(&block(py, async move { c.locate(&path).await })?)
    }

    /// A reader of `path`: its chunks are fetched (and their digests
    /// checked) one at a time as reads reach them.
    fn open_reader(&self, py: Python<'_>, path: String) -> PyResult<Reader> {
        let c = self.inner.clone();
        let p = path.clone();
        let loc = block(py, async move { c.locate(&p).await })?;
        if loc.status.kind == FileKind::Dir {
            return Err(PyIsADirectoryError::new_err(format!(
                "{path}: is a directory"
            )));
        }
        Ok(Reader {
            client: self.inner.clone(),
            path,
            size: loc.status.size,
            chunks: loc.chunks,
            pos: 0,
            cached: None,
        })
    }

    /// A writer of a new file at `path`; nothing is visible until `close`.
    #[pyo3(signature = (path, overwrite=false, replication=None, chunk_size=None))]
    fn open_writer(
        &self,
        py: Python<'_>,
        path: String,
        overwrite: bool,
        replication: Option<u8>,
        chunk_size: Option<u64>,
    ) -> PyResult<Writer> {
        let c = self.inner.clone();
        let opts = write_options(replication, chunk_size, overwrite);
        let w = block(py, async move { c.create(&path, opts).await })?;
        Ok(Writer { inner: Some(w) })
    }

    /// Stores records already laid out (features then label, little-endian,
    /// record after record) as a dataset directory; returns its manifest.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (path, records, feature_shape, feature_dtype, label_dtype, classes, chunk_size=None, replication=None))]
    fn import_records(
        &self,
        py: Python<'_>,
        path: String,
        records: &[u8],
        feature_shape: Vec<usize>,
        feature_dtype: &str,
        label_dtype: &str,
        classes: u32,
        chunk_size: Option<u64>,
        replication: Option<u8>,
    ) -> PyResult<String> {
        let layout = RecordLayout::new(feature_shape, dtype(feature_dtype)?, dtype(label_dtype)?)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let size = layout.record_size();
        if !records.len().is_multiple_of(size) {
            return Err(PyValueError::new_err(format!(
                "{} bytes of records is not a whole number of {size}-byte records",
                records.len()
            )));
        }
        let data = Encoded {
            records: (records.len() / size) as u64,
            layout,
            classes,
            bytes: records.to_vec(),
        };
        let defaults = ImportOptions::default();
        let opts = ImportOptions {
            chunk_size: chunk_size.unwrap_or(defaults.chunk_size),
            replication: replication.unwrap_or(defaults.replication),
            source: "numpy arrays (quern Python package)".into(),
            ..defaults
        };
        let c = self.inner.clone();
        let ds = block(
            py,
            async move { c.import_dataset(&path, &data, &opts).await },
        )?;
        json(&ds.manifest)
    }

    /// A dataset's manifest (layout, records, parts, statistics if any).
    fn dataset_info(&self, py: Python<'_>, path: String) -> PyResult<String> {
        let c = self.inner.clone();
        let ds = block(py, async move { c.open_dataset(&path).await })?;
        json(&ds.manifest)
    }

    /// Statistics by map tasks on the datanodes (kept in the manifest).
    fn dataset_stats(&self, py: Python<'_>, path: String) -> PyResult<String> {
        let c = self.inner.clone();
        let stats = block(py, async move {
            let mut ds: Dataset = c.open_dataset(&path).await?;
            c.dataset_stats(&mut ds, &JobOptions::default())
                .await
                .map(|(s, _)| s)
        })?;
        json(&stats)
    }

    /// Every record of a dataset, pulled to this process.
    fn dataset_records<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyBytes>> {
        let c = self.inner.clone();
        let bytes = block(py, async move {
            let ds = c.open_dataset(&path).await?;
            c.read_records(&ds).await
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Trains `model_json` (with its compile settings) from `init` on a
    /// dataset, on the datanodes. `on_event` gets every event as JSON, as
    /// it happens. Ctrl-C stops the job on every datanode and raises
    /// KeyboardInterrupt. Returns (events, summary, scaler) as JSON and the
    /// trained parameters.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (dataset, model_json, init, batch, epochs, max_iter, display, plan, sync, seed, scale, shuffle, validation=None, on_event=None, workers=None))]
    fn train<'py>(
        &self,
        py: Python<'py>,
        dataset: String,
        model_json: String,
        init: &[u8],
        batch: u64,
        epochs: u64,
        max_iter: Option<u64>,
        display: u64,
        plan: &str,
        sync: u64,
        seed: u64,
        scale: &str,
        shuffle: bool,
        validation: Option<String>,
        on_event: Option<PyObject>,
        workers: Option<usize>,
    ) -> PyResult<(String, String, String, Bound<'py, PyBytes>)> {
        let (model, objective, optimizer) = keras_model(&model_json)?;
        let init = f32s("initial weights", init)?;
        if init.len() != model.param_count() {
            return Err(PyValueError::new_err(format!(
                "{} initial weights for a model of {} parameters",
                init.len(),
                model.param_count()
            )));
        }
        if batch == 0 || sync == 0 {
            return Err(PyValueError::new_err(
                "batch_size and sync must be at least 1",
            ));
        }
        let opts = TrainOptions {
            model_json: model.keras_json().to_string(),
            init,
            optimizer,
            epochs,
            batch,
            max_iter,
            seed,
            shuffle,
            scale: scale.parse().map_err(PyValueError::new_err)?,
            display,
            sync,
            objective,
            plan: plan.parse().map_err(PyValueError::new_err)?,
            workers,
        };
        let rt = runtime()?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Waited on with the GIL released, which needs a shareable handle.
        let rx = std::sync::Mutex::new(rx);
        let c = self.inner.clone();
        let mut job = rt.spawn(async move {
            let mut ds = c.open_dataset(&dataset).await?;
            let val = match &validation {
                Some(v) => Some(c.open_dataset(v).await?),
                None => None,
            };
            c.train(&mut ds, val.as_ref(), &opts, |e| {
                if let Ok(j) = serde_json::to_string(e) {
                    let _ = tx.send(j);
                }
            })
            .await
        });
        // Events are handed to Python as they come; between them the GIL
        // is free and Ctrl-C is looked for. Whatever stops this loop early
        // (Ctrl-C, an exception in `on_event`) stops the job too: dropping
        // the training future closes it on every worker.
        let watched = loop {
            let next = py.allow_threads(|| match rx.lock() {
                Ok(r) => r.recv_timeout(std::time::Duration::from_millis(100)),
                Err(_) => Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            });
            let handled = match (next, &on_event) {
                (Ok(event), Some(f)) => f.call1(py, (event,)).map(|_| ()),
                _ => Ok(()),
            }
            .and_then(|()| py.check_signals());
            if let Err(e) = handled {
                break Err(e);
            }
            if job.is_finished() {
                break Ok(());
            }
        };
        if let Err(e) = watched {
            job.abort();
            let _ = py.allow_threads(|| rt.block_on(&mut job));
            return Err(e);
        }
        let done = py.allow_threads(|| rt.block_on(&mut job));
        // Events sent just before the end.
        let rest: Vec<String> = match rx.lock() {
            Ok(r) => r.try_iter().collect(),
            Err(_) => Vec::new(),
        };
        if let Some(f) = &on_event {
            for event in rest {
                f.call1(py, (event,))?;
            }
        }
        let outcome = done
            .map_err(|e| QuernError::new_err(format!("the training task failed: {e}")))?
            .map_err(py_err)?;
        let params: Vec<u8> = outcome
            .params
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        Ok((
            json(&outcome.events)?,
            json(&outcome.summary)?,
            json(&outcome.scaler)?,
            PyBytes::new(py, &params),
        ))
    }

    /// Loss, accuracy and the confusion matrix of a model on a dataset, by
    /// map tasks; returns the scores as JSON.
    fn score(
        &self,
        py: Python<'_>,
        dataset: String,
        model_json: String,
        params: &[u8],
        scaler: &str,
    ) -> PyResult<String> {
        let (model, objective, _) = keras_model(&model_json)?;
        let params = f32s("weights", params)?;
        let scaler = scaler_from(scaler)?;
        let json_model = model.keras_json().to_string();
        let c = self.inner.clone();
        let (scores, _) = block(py, async move {
            let ds = c.open_dataset(&dataset).await?;
            c.score(&ds, &json_model, &params, &scaler, objective).await
        })?;
        let accuracy = scores.accuracy();
        let loss = scores.loss();
        json(&serde_json::json!({
            "loss": loss,
            "accuracy": accuracy,
            "count": scores.count,
            "classes": scores.classes,
            "confusion": scores.confusion,
        }))
    }

    /// The model's outputs for every record of a dataset, by map tasks:
    /// (outputs per record, their values as little-endian f32).
    fn predict<'py>(
        &self,
        py: Python<'py>,
        dataset: String,
        model_json: String,
        params: &[u8],
        scaler: &str,
    ) -> PyResult<(usize, Bound<'py, PyBytes>)> {
        let (model, _, _) = keras_model(&model_json)?;
        let params = f32s("weights", params)?;
        let scaler = scaler_from(scaler)?;
        let json_model = model.keras_json().to_string();
        let c = self.inner.clone();
        let p = block(py, async move {
            let ds = c.open_dataset(&dataset).await?;
            c.predict(&ds, &json_model, &params, &scaler).await
        })?;
        let raw: Vec<u8> = p.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((p.outputs, PyBytes::new(py, &raw)))
    }

    /// The scaler quern's training uses, fitted on the dataset's
    /// statistics (computed first when the manifest has none).
    fn dataset_scaler(&self, py: Python<'_>, path: String, kind: &str) -> PyResult<String> {
        let kind: ScaleKind = kind.parse().map_err(PyValueError::new_err)?;
        let c = self.inner.clone();
        let scaler: Scaler = block(py, async move {
            let mut ds = c.open_dataset(&path).await?;
            c.scaler_for(&mut ds, kind).await
        })?;
        json(&scaler)
    }
}

/// A Keras model as training takes it: the JSON of `to_json()` with the
/// live model's `compile_config` in it.
fn keras_model(model_json: &str) -> PyResult<(Model, Objective, OptimizerConfig)> {
    let bad = |e: String| PyValueError::new_err(e);
    let model = Model::from_keras_json(model_json).map_err(|e| bad(e.to_string()))?;
    let optimizer = model
        .compile_settings()
        .map_err(|e| bad(e.to_string()))?
        .map(|c| c.optimizer)
        .unwrap_or_else(|| OptimizerConfig::from(Sgd::default()));
    let loss = model
        .compile_loss()
        .map_err(|e| bad(e.to_string()))?
        .unwrap_or_default();
    let objective = Objective {
        loss,
        ..Objective::default()
    };
    objective.check(&model).map_err(|e| bad(e.to_string()))?;
    Ok((model, objective, optimizer))
}

fn f32s(what: &str, raw: &[u8]) -> PyResult<Vec<f32>> {
    f32s_from_le(raw).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

fn scaler_from(json_text: &str) -> PyResult<Scaler> {
    serde_json::from_str(json_text).map_err(|e| PyValueError::new_err(format!("scaler: {e}")))
}

/// The CLI's defaults for what the caller left out.
fn write_options(
    replication: Option<u8>,
    chunk_size: Option<u64>,
    overwrite: bool,
) -> WriteOptions {
    let defaults = WriteOptions::default();
    WriteOptions {
        replication: replication.unwrap_or(defaults.replication),
        chunk_size: chunk_size.unwrap_or(defaults.chunk_size),
        overwrite,
        mode: defaults.mode,
    }
}

fn dtype(name: &str) -> PyResult<DType> {
    match name {
        "uint8" => Ok(DType::U8),
        "uint32" => Ok(DType::U32),
        "float32" => Ok(DType::F32),
        other => Err(PyValueError::new_err(format!(
            "dtype {other}: records hold uint8, uint32 or float32"
        ))),
    }
}

/// The Rust half of `quern.File` in read mode.
#[pyclass(module = "quern._quern")]
struct Reader {
    client: Inner,
    path: String,
    size: u64,
    chunks: Vec<LocatedChunk>,
    pos: u64,
    /// The chunk read last: (index, bytes).
    cached: Option<(usize, bytes::Bytes)>,
}

#[pymethods]
impl Reader {
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    fn tell(&self) -> u64 {
        self.pos
    }

    fn seek(&mut self, pos: u64) -> u64 {
        self.pos = pos;
        pos
    }

    /// Reads up to `len` bytes at the current position straight into the
    /// caller's memory at `addr`; returns the bytes read, 0 at the end.
    ///
    /// The limited Python API of 3.9 has no buffer protocol, so
    /// `quern.File.readinto` passes the address of the writable,
    /// contiguous buffer it was given (from numpy, which checked both) and
    /// keeps that buffer exported, and so alive and unresizable, for the
    /// whole call. Only that wrapper calls this.
    fn readinto_address(&mut self, py: Python<'_>, addr: usize, len: usize) -> PyResult<usize> {
        if addr == 0 && len > 0 {
            return Err(PyValueError::new_err("readinto: no buffer"));
        }
        let mut done = 0;
        while done < len && self.pos < self.size {
            let (idx, bytes) = self.chunk_at(py)?;
            let start = (self.pos - self.chunks[idx].offset) as usize;
            let n = (bytes.len() - start).min(len - done);
            // SAFETY: per the contract above, [addr, addr + len) is one
            // writable allocation that stays alive and unmoved for this
            // call; `done + n <= len`, and the GIL is held while writing.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes[start..start + n].as_ptr(),
                    (addr as *mut u8).add(done),
                    n,
                );
            }
            done += n;
            self.pos += n as u64;
        }
        Ok(done)
    }
}

impl Reader {
    /// The chunk holding the current position, fetched if not cached.
    fn chunk_at(&mut self, py: Python<'_>) -> PyResult<(usize, bytes::Bytes)> {
        let pos = self.pos;
        let idx = self
            .chunks
            .partition_point(|c| c.offset + c.meta.size <= pos);
        let Some(chunk) = self.chunks.get(idx).cloned() else {
            return Err(QuernError::new_err(format!(
                "{}: no chunk holds byte {pos} of {}",
                self.path, self.size
            )));
        };
        if let Some((i, b)) = &self.cached {
            if *i == idx {
                return Ok((idx, b.clone()));
            }
        }
        let c = self.client.clone();
        let path = self.path.clone();
        let (bytes, _) = block(py, async move { c.read_chunk(&path, &chunk).await })?;
        self.cached = Some((idx, bytes.clone()));
        Ok((idx, bytes))
    }
}

/// The Rust half of `quern.File` in write mode.
#[pyclass(module = "quern._quern")]
struct Writer {
    /// None once closed or aborted.
    inner: Option<quern_client::FileWriter>,
}

#[pymethods]
impl Writer {
    fn write(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<usize> {
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("write to a closed file"))?;
        let n = data.len();
        block(py, w.write(data))?;
        Ok(n)
    }

    /// Completes the file; returns its status as JSON.
    fn close(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        match self.inner.take() {
            Some(w) => json(&block(py, w.close())?).map(Some),
            None => Ok(None),
        }
    }

    /// Drops the file being written: nothing of it stays.
    fn abort(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(w) = self.inner.take() {
            let rt = runtime()?;
            py.allow_threads(|| rt.block_on(w.abort()));
        }
        Ok(())
    }
}

#[pymodule]
fn _quern(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_class::<Client>()?;
    m.add_class::<Reader>()?;
    m.add_class::<Writer>()?;
    m.add("QuernError", m.py().get_type::<QuernError>())?;
    Ok(())
}
