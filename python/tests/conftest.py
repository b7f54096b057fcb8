"""A real local cluster for the tests: `quern cluster up` in a temporary
directory, stopped with `quern cluster down` afterwards."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import quern

REPO = Path(__file__).resolve().parents[2]


def quern_bin() -> str:
    """`$QUERN_BIN`, else the repository's own build, else `quern` on PATH."""
    if os.environ.get("QUERN_BIN"):
        return os.environ["QUERN_BIN"]
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / "quern"
        if p.exists():
            return str(p)
    found = shutil.which("quern")
    if found is None:
        pytest.exit("no quern binary: build it (cargo build -p quern) or set QUERN_BIN", 2)
    return found


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k != "QUERN_CONFIG"}
    up = subprocess.run(
        [quern_bin(), "cluster", "up", "--dir", str(d), "--datanodes", "3", "--heartbeat", "200ms"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield d
    subprocess.run([quern_bin(), "cluster", "down", "--dir", str(d)], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def client(cluster):
    return quern.connect(cluster / "client.toml")
