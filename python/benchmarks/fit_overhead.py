"""What quern.keras.Estimator.fit on numpy arrays costs beyond `quern train`
on the same data already stored: the upload, the temporary dataset's
statistics, and the Python side. Prints both wall times and the ratio.

    python python/benchmarks/fit_overhead.py            # one epoch of Fashion-MNIST
    MAX_ITER=100 python python/benchmarks/fit_overhead.py

Needs the package installed (pip install ./python), Keras, Debian's
dataset-fashion-mnist and a built `quern` (QUERN_BIN, else target/release).
"""

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import keras
import quern
import quern.keras

REPO = Path(__file__).resolve().parents[2]
QUERN = os.environ.get("QUERN_BIN") or str(REPO / "target" / "release" / "quern")
FASHION = Path("/usr/share/datasets/fashion-mnist")
MAX_ITER = os.environ.get("MAX_ITER")


def idx(name, offset):
    with gzip.open(FASHION / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def seed_cnn():
    keras.utils.set_random_seed(1)
    m = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
              loss="sparse_categorical_crossentropy")
    return m


def main():
    x = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    y = idx("train-labels-idx1-ubyte.gz", 8)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        env = {k: v for k, v in os.environ.items() if k != "QUERN_CONFIG"}
        subprocess.run([QUERN, "cluster", "up", "--dir", str(d / "c"), "--datanodes", "3"],
                       env=env, check=True, capture_output=True)
        try:
            client = quern.connect(d / "c" / "client.toml")
            stored = quern.Dataset.from_numpy(client, "/bench/stored", x, y, replication=2)
            stored.stats()  # already stored means statistics too
            model = seed_cnn()
            model.save(d / "seed.keras")
            limit = ["--max-iter", MAX_ITER] if MAX_ITER else []
            t = time.perf_counter()
            subprocess.run(
                [QUERN, "train", "--model", str(d / "seed.keras"), "--data", "/bench/stored",
                 "--epochs", "1", "--batch-size", "100", "--seed", "1", "--scale", "minmax",
                 "--display", "50", "--out", "/bench/ck", *limit],
                env=dict(env, QUERN_CONFIG=str(d / "c" / "client.toml")), check=True,
                capture_output=True,
            )
            cli_s = time.perf_counter() - t
            est = quern.keras.Estimator(client, seed_cnn(), batch_size=100, epochs=1,
                                        max_iter=int(MAX_ITER) if MAX_ITER else None,
                                        display=50, scale="minmax", seed=1, progress=None)
            t = time.perf_counter()
            est.fit(x, y)
            py_s = time.perf_counter() - t
        finally:
            subprocess.run([QUERN, "cluster", "down", "--dir", str(d / "c")], env=env,
                           capture_output=True)
    print(json.dumps({
        "iterations": int(MAX_ITER) if MAX_ITER else 600,
        "quern_train_stored_s": round(cli_s, 2),
        "estimator_fit_arrays_s": round(py_s, 2),
        "ratio": round(py_s / cli_s, 3),
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
