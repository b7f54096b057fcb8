"""Train live Keras models on a quern cluster, as SystemML's Keras2DML did
from Spark::

    import keras, quern, quern.keras
    client = quern.connect()
    model = keras.Sequential([...]); model.compile(optimizer="sgd", loss=...)
    est = quern.keras.Estimator(client, model, batch_size=100, epochs=1, display=10)
    history = est.fit(x_train, y_train)      # trains on the datanodes
    est.score(x_test, y_test)                # {"loss": ..., "accuracy": ...}
    model.predict(x_test)                    # the live model holds the trained weights

Keras is imported only here, and only when an Estimator is made.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import Client, Dataset

__all__ = ["Estimator", "History"]

ArrayOrPath = Union[np.ndarray, str]


class History:
    """What ``fit`` returns, shaped like Keras's: ``history.history["loss"]``
    per epoch (``accuracy``, ``val_loss`` and ``val_accuracy`` likewise),
    ``history.steps`` per displayed iteration, ``history.events`` every
    event of the job and ``history.summary`` its figures."""

    def __init__(self, events: List[Dict[str, Any]], summary: Dict[str, Any]) -> None:
        self.events = events
        self.summary = summary
        self.history: Dict[str, List[float]] = {"loss": [], "accuracy": []}
        self.steps: List[Dict[str, Any]] = [e for e in events if e["event"] == "step"]
        self.epoch: List[int] = []
        for e in events:
            if e["event"] != "epoch":
                continue
            self.epoch.append(e["epoch"] - 1)
            self.history["loss"].append(e["loss"])
            self.history["accuracy"].append(e["accuracy"])
            if e.get("val_loss") is not None:
                self.history.setdefault("val_loss", []).append(e["val_loss"])
                self.history.setdefault("val_accuracy", []).append(e["val_accuracy"])


class Estimator:
    """A Keras model trained on the cluster's datanodes.

    ``keras_model`` is a live Keras 3 model: its architecture, current
    weights and compile settings (optimizer and loss, unless ``optimizer``
    or ``loss`` override them) define the job. ``epochs`` or ``max_iter``
    bound it; every ``display`` iterations a progress line is printed as
    Keras's fit log does (``progress="tqdm"`` draws a bar, ``None`` is
    silent). ``plan``, ``sync``, ``workers`` and ``seed`` are ``quern train``'s. Data
    given as arrays is stored as a temporary dataset under ``tmp_dir`` and
    removed afterwards; data given as a dataset path stays put, and
    ``scale`` (``"none"``, ``"minmax"``, ``"standard"``) scales it by its
    distributed statistics, or ``"1/255"`` divides it by 255."""

    def __init__(
        self,
        client: Client,
        keras_model: Any,
        batch_size: int = 100,
        epochs: int = 1,
        max_iter: Optional[int] = None,
        display: int = 10,
        optimizer: Any = None,
        loss: Any = None,
        plan: str = "auto",
        sync: int = 1,
        workers: Optional[int] = None,
        seed: Optional[int] = None,
        scale: str = "none",
        shuffle: bool = True,
        progress: Optional[str] = "log",
        tmp_dir: str = "/tmp",
    ) -> None:
        import keras  # noqa: F401  (fails early, and clearly, without Keras)

        self.client = client
        self.model = keras_model
        self.batch_size = batch_size
        self.epochs = epochs
        self.max_iter = max_iter
        self.display = display
        self.optimizer = optimizer
        self.loss = loss
        self.plan = plan
        self.sync = sync
        self.workers = workers
        self.seed = seed if seed is not None else secrets.randbits(32)
        self.scale = scale
        self.shuffle = shuffle
        self.progress = progress
        self.tmp_dir = tmp_dir
        self.scaler_json: Optional[str] = None
        self.history: Optional[History] = None

    # ------------------------------------------------------------ the model

    def _model_json(self) -> str:
        """``to_json()`` with the compile settings training uses."""
        import keras

        cfg = json.loads(self.model.to_json())
        compile_config: Dict[str, Any] = {}
        if getattr(self.model, "compiled", False):
            compile_config = dict(self.model.get_compile_config() or {})
        if self.optimizer is not None:
            opt = keras.optimizers.get(self.optimizer)
            compile_config["optimizer"] = keras.saving.serialize_keras_object(opt)
        if self.loss is not None:
            compile_config["loss"] = keras.saving.serialize_keras_object(keras.losses.get(self.loss))
        if compile_config:
            cfg["compile_config"] = compile_config
        return json.dumps(cfg)

    def _weights(self) -> bytes:
        """The live model's weights, flat in ``get_weights()`` order."""
        ws = self.model.get_weights()
        if not ws:
            return b""
        return np.concatenate([np.asarray(w, dtype="<f4").ravel() for w in ws]).tobytes()

    def _set_weights(self, raw: bytes) -> None:
        flat = np.frombuffer(raw, dtype="<f4")
        out, at = [], 0
        for w in self.model.get_weights():
            n = int(np.prod(w.shape))
            out.append(flat[at : at + n].reshape(w.shape).astype(w.dtype))
            at += n
        if at != flat.size:
            raise ValueError(f"{flat.size} trained weights for a model of {at}")
        self.model.set_weights(out)

    # ------------------------------------------------------------ data

    def _dataset(self, x: ArrayOrPath, y: Optional[np.ndarray]) -> Tuple[str, bool]:
        """A dataset path for ``x``: itself, or arrays stored for the call."""
        if isinstance(x, str):
            if y is not None:
                raise ValueError("give labels with arrays, not with a dataset path")
            return x, False
        if y is None:
            raise ValueError("arrays need their labels: fit(x, y)")
        path = f"{self.tmp_dir.rstrip('/')}/quern-estimator-{secrets.token_hex(6)}"
        self.client.mkdir(self.tmp_dir)
        Dataset.from_numpy(self.client, path, x, y, replication=1)
        return path, True

    # ------------------------------------------------------------ the verbs

    def fit(
        self,
        x: ArrayOrPath,
        y: Optional[np.ndarray] = None,
        validation_data: Optional[Union[Tuple[np.ndarray, np.ndarray], str]] = None,
    ) -> History:
        """Trains on ``x`` (arrays with labels ``y``, or a dataset path) on
        the datanodes, then sets the trained weights into the live model.
        Ctrl-C stops the job on every datanode (KeyboardInterrupt)."""
        model_json = self._model_json()
        path, temporary = self._dataset(x, y)
        val_path, val_temporary = None, False
        try:
            if validation_data is not None:
                if isinstance(validation_data, str):
                    val_path, val_temporary = self._dataset(validation_data, None)
                else:
                    val_path, val_temporary = self._dataset(*validation_data)
            show = _Progress(self.progress, self.epochs)
            events, summary, scaler, params = self.client._c.train(
                path,
                model_json,
                self._weights(),
                self.batch_size,
                self.epochs,
                self.max_iter,
                self.display,
                self.plan,
                self.sync,
                self.seed,
                self.scale,
                self.shuffle,
                val_path,
                show,
                self.workers,
            )
            show.close()
        finally:
            for p, temp in ((path, temporary), (val_path, val_temporary)):
                if temp and p is not None:
                    try:
                        self.client.rm(p, recursive=True)
                    except Exception as e:  # the job's error matters more
                        print(f"quern: could not remove {p}: {e}", file=sys.stderr)
        self._set_weights(params)
        self.scaler_json = scaler
        self.history = History(json.loads(events), json.loads(summary))
        return self.history

    def _scaler(self, path: str) -> str:
        if self.scaler_json is not None:
            return self.scaler_json
        return self.client._c.dataset_scaler(path, self.scale)

    def score(self, x: ArrayOrPath, y: Optional[np.ndarray] = None) -> Dict[str, Any]:
        """Loss, accuracy and the confusion matrix of the live model's
        weights on ``x``, by map tasks where the data is."""
        path, temporary = self._dataset(x, y)
        try:
            out = json.loads(
                self.client._c.score(path, self._model_json(), self._weights(), self._scaler(path))
            )
        finally:
            if temporary:
                self.client.rm(path, recursive=True)
        k = out["classes"]
        out["confusion"] = np.asarray(out["confusion"], dtype=np.int64).reshape(k, k) if k else None
        return out

    evaluate = score

    def predict(self, x: ArrayOrPath) -> np.ndarray:
        """The live model's outputs for every example of ``x`` (arrays, or a
        dataset path), computed by map tasks on the datanodes."""
        if isinstance(x, str):
            path, temporary = x, False
        else:
            x = np.asarray(x)
            path, temporary = self._dataset(x, np.zeros(len(x), dtype=np.uint8))
        try:
            outputs, raw = self.client._c.predict(
                path, self._model_json(), self._weights(), self._scaler(path)
            )
        finally:
            if temporary:
                self.client.rm(path, recursive=True)
        values = np.frombuffer(raw, dtype="<f4")
        return values.reshape(-1, *self.model.output_shape[1:]) if outputs else values


class _Progress:
    """Prints the job's events as Keras's fit log does, or draws a bar."""

    def __init__(self, mode: Optional[str], epochs: int) -> None:
        self.mode = mode
        self.epochs = epochs
        self.total = 0
        self.bar: Any = None

    def __call__(self, text: str) -> None:
        e = json.loads(text)
        kind = e["event"]
        if self.mode is None:
            return
        if kind == "planned":
            print(f"plan: {e['plan']} ({e['reason']})")
        elif kind == "started":
            self.total = e["iterations"]
            workers = ", ".join(f"{a} ({n} records)" for a, n in e["workers"])
            print(f"training on {e['records']} records over {len(e['workers'])} workers: {workers}")
            if self.mode == "tqdm":
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.total, unit="it")
        elif kind == "step":
            line = (
                f"{e['iteration']}/{self.total} - loss: {e['loss']:.4f} - "
                f"accuracy: {e['accuracy']:.4f} - {e['samples_per_sec']:.0f} samples/s"
            )
            if self.bar is not None:
                self.bar.n = e["iteration"]
                self.bar.set_postfix_str(f"loss {e['loss']:.4f} acc {e['accuracy']:.4f}")
                self.bar.refresh()
            else:
                print(line)
        elif kind == "epoch":
            line = (
                f"Epoch {e['epoch']}/{self.epochs} - {e['seconds']:.0f}s - loss: {e['loss']:.4f} - "
                f"accuracy: {e['accuracy']:.4f}"
            )
            if e.get("val_loss") is not None:
                line += f" - val_loss: {e['val_loss']:.4f} - val_accuracy: {e['val_accuracy']:.4f}"
            print(line)
        elif kind == "worker_lost":
            print(f"worker {e['worker']} lost at iteration {e['iteration']}: {e['error']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
