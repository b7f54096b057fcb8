"""examples/mnist_keras.ipynb runs top to bottom under Jupyter's own runner
against the test cluster (a short run: QUERN_NOTEBOOK_MAX_ITER)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nbconvert")
keras = pytest.importorskip("keras")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "mnist_keras.ipynb"


def test_the_notebook_runs_top_to_bottom(cluster, tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("install dataset-fashion-mnist (.ci/run does)")
    env = dict(
        os.environ,
        QUERN_CONFIG=str(cluster / "client.toml"),
        QUERN_NOTEBOOK_MAX_ITER="40",
        QUERN_NOTEBOOK_OUT=str(tmp_path),
    )
    out = tmp_path / "executed.ipynb"
    run = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
         "--ExecutePreprocessor.timeout=600", str(NOTEBOOK), "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    text = json.dumps(json.loads(out.read_text()))
    assert "test accuracy" in text
    assert "40/40 - loss" in text, "progress lines as Keras's fit log prints them"
    assert (tmp_path / "fashion_cnn.keras").exists()
    model = keras.saving.load_model(tmp_path / "fashion_cnn.keras")
    assert model.count_params() == 1_663_370
