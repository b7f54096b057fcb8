"""quern.keras.Estimator against a live Keras model and against `quern
train` on the same data with the same settings."""

import gzip
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import quern  # noqa: E402
import quern.keras  # noqa: E402
from conftest import quern_bin  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def fashion(n_train=2000, n_test=500):
    """A slice of Fashion-MNIST (Debian's dataset-fashion-mnist)."""

    def idx(name, offset):
        with gzip.open(FASHION / name) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    if not FASHION.exists():
        pytest.skip("install dataset-fashion-mnist (.ci/run does)")
    x = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    y = idx("train-labels-idx1-ubyte.gz", 8)
    xt = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    yt = idx("t10k-labels-idx1-ubyte.gz", 8)
    return x[:n_train], y[:n_train], xt[:n_test], yt[:n_test]


def small_cnn(seed=3):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(8, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    m.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return m


def test_fit_matches_quern_train_with_the_same_settings(client, cluster, tmp_path):
    x, y, xt, yt = fashion()
    train = quern.Dataset.from_numpy(client, "/keras/train", x, y, chunk_size=785 * 500, replication=1)
    quern.Dataset.from_numpy(client, "/keras/test", xt, yt, replication=1)
    model = small_cnn()
    saved = tmp_path / "start.keras"
    model.save(saved)
    est = quern.keras.Estimator(
        client, model, batch_size=50, epochs=2, display=20, plan="distributed", workers=2,
        seed=7, scale="minmax", progress=None,
    )
    history = est.fit(train.path)
    # Two of the three datanodes train; each fetches the chunks it lacks.
    assert history.summary["workers"] == 2
    assert len(history.history["loss"]) == 2
    assert history.history["loss"][1] < history.history["loss"][0]
    mine = est.score("/keras/test")

    env = dict(os.environ, QUERN_CONFIG=str(cluster / "client.toml"))
    run = subprocess.run(
        [quern_bin(), "train", "--model", str(saved), "--data", "/keras/train", "--epochs", "2",
         "--batch-size", "50", "--plan", "distributed", "--workers", "2", "--seed", "7", "--scale", "minmax",
         "--out", "/keras/ckpt", "--force"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    score = subprocess.run(
        [quern_bin(), "score", "--model", "/keras/ckpt", "--data", "/keras/test", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert score.returncode == 0, score.stderr
    theirs = json.loads(score.stdout)
    assert mine["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-12)
    assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-9)
    assert mine["accuracy"] > 0.5


def test_fit_on_arrays_sets_the_live_models_weights(client):
    x, y, xt, yt = fashion(1500, 300)
    x = x.astype(np.float32) / 255.0
    xt = xt.astype(np.float32) / 255.0
    model = small_cnn(seed=5)
    before = [w.copy() for w in model.get_weights()]
    est = quern.keras.Estimator(client, model, batch_size=50, epochs=1, display=10, seed=1)
    history = est.fit(x, y, validation_data=(xt, yt))
    assert "val_accuracy" in history.history
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # The temporary datasets are gone.
    assert not [e for e in client.ls("/tmp") if "quern-estimator" in e["path"]]
    mine = est.predict(xt)
    keras_says = model.predict(xt, verbose=0)
    np.testing.assert_allclose(mine, keras_says, atol=1e-5)
    s = est.evaluate(xt, yt)
    assert s["accuracy"] == pytest.approx(
        float((keras_says.argmax(axis=1) == yt).mean()), abs=1e-9
    )
    assert s["confusion"].shape == (10, 10) and s["confusion"].sum() == len(yt)


def test_ctrl_c_stops_the_job_on_every_datanode(client):
    x, y, _, _ = fashion(2000, 10)
    ds = quern.Dataset.from_numpy(client, "/keras/long", x, y, chunk_size=785 * 400, replication=1)
    model = small_cnn()
    est = quern.keras.Estimator(
        client, model, batch_size=20, epochs=50, plan="distributed", progress=None, scale="minmax"
    )
    seen = {}

    def interrupt():
        # Wait until the workers hold the job, then press Ctrl-C.
        deadline = time.time() + 60
        while time.time() < deadline:
            jobs = sum(d["jobs"] for d in client.report()["datanodes"])
            if jobs:
                seen["jobs"] = jobs
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt)
    t.start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        est.fit(ds.path)
    t.join()
    assert seen.get("jobs", 0) > 0, "the job never reached the datanodes"
    assert time.time() - started < 120
    # Every datanode frees the job (reported with its next heartbeats).
    deadline = time.time() + 10
    while time.time() < deadline:
        if all(d["jobs"] == 0 for d in client.report()["datanodes"]):
            break
        time.sleep(0.2)
    assert all(d["jobs"] == 0 for d in client.report()["datanodes"]), client.report()
