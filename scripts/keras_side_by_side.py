#!/usr/bin/env python3
"""Keras 3 runs to compare quern against on the same machine (issue 11's checks).

    python3 -m venv venv && venv/bin/pip install tensorflow-cpu
    venv/bin/python scripts/keras_side_by_side.py resnet_mini   # 1 epoch on Fashion-MNIST
    venv/bin/python scripts/keras_side_by_side.py mobilenet_v2  # train-step samples/s

resnet_mini: tests/fixtures/keras/resnet_mini.keras (compiled SGD 0.01, momentum 0.9,
sparse categorical cross-entropy) trained one epoch, batch 100, on Fashion-MNIST scaled to
[0, 1] by /255, or with SCALE=minmax per pixel as quern's default --scale minmax does, then
scored on the test set. SHUFFLE=0 keeps the examples in stored order (fit(shuffle=False)),
to compare with `quern train --no-shuffle` on one datanode: the same batches in the same order.
mobilenet_v2: tests/fixtures/keras/apps/mobilenet_v2.json (alpha 0.35, 32x32x3, 10 classes),
batch 64, SGD; the median of 20 timed train_on_batch steps after 3 warm-up steps.
Prints one JSON line.
"""
import gzip
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import keras  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FASHION = "/usr/share/datasets/fashion-mnist"


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def resnet_mini():
    keras.utils.set_random_seed(int(os.environ.get("SEED", "42")))
    m = keras.saving.load_model(os.path.join(ROOT, "tests/fixtures/keras/resnet_mini.keras"))
    x = idx(f"{FASHION}/train-images-idx3-ubyte.gz").astype("float32").reshape(-1, 28, 28, 1) / 255.0
    y = idx(f"{FASHION}/train-labels-idx1-ubyte.gz").astype("int64")
    xt = idx(f"{FASHION}/t10k-images-idx3-ubyte.gz").astype("float32").reshape(-1, 28, 28, 1) / 255.0
    yt = idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz").astype("int64")
    if os.environ.get("SCALE") == "minmax":
        # Per pixel, as sklearn's MinMaxScaler (and quern's --scale minmax) does.
        raw = x * 255.0
        lo, hi = raw.min(axis=0), raw.max(axis=0)
        rng = np.where(hi > lo, hi - lo, 1.0)
        x = (raw - lo) / rng
        xt = (xt * 255.0 - lo) / rng
    t = time.time()
    shuffle = os.environ.get("SHUFFLE", "1") != "0"
    h = m.fit(x, y, batch_size=100, epochs=1, verbose=0, shuffle=shuffle)
    secs = time.time() - t
    loss, acc = m.evaluate(xt, yt, batch_size=500, verbose=0)
    return {"model": "resnet_mini", "scale": os.environ.get("SCALE", "/255"),
            "seed": int(os.environ.get("SEED", "42")), "shuffle": shuffle,
            "train_loss": h.history["loss"][-1], "train_accuracy": h.history["accuracy"][-1],
            "test_accuracy": acc, "test_loss": loss,
            "epoch_seconds": secs, "samples_per_s": len(x) / secs}


def mobilenet_v2():
    keras.utils.set_random_seed(42)
    with open(os.path.join(ROOT, "tests/fixtures/keras/apps/mobilenet_v2.json")) as f:
        m = keras.models.model_from_json(f.read())
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 64)
    for _ in range(3):
        m.train_on_batch(x, y)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        m.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    return {"model": "mobilenet_v2_0.35_32", "batch": 64, "ms_per_step": med * 1e3,
            "samples_per_s": 64 / med}


if __name__ == "__main__":
    print(json.dumps({"resnet_mini": resnet_mini, "mobilenet_v2": mobilenet_v2}[sys.argv[1]]()))
