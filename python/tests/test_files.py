import io
import os

import numpy as np
import pytest

import quern


def test_put_get_round_trip_is_byte_equal(client, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    client.mkdir("/files")
    st = client.put(src, "/files/a.bin", chunk_size=1 << 20, replication=2)
    assert st["size"] == len(data) and st["chunks"] == 4
    out = tmp_path / "out.bin"
    assert client.get("/files/a.bin", out) == len(data)
    assert out.read_bytes() == data
    names = [e["path"] for e in client.ls("/files")]
    assert "/files/a.bin" in names
    assert client.stat("/files/a.bin")["replication"] == 2
    assert len(client.locate("/files/a.bin")["chunks"]) == 4
    assert client.fsck("/files")["health"] == "Healthy"


def test_a_100_mib_file_through_open(client):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=100 * 1024 * 1024, dtype=np.uint8).tobytes()
    with client.open("/files/big.bin", "wb", chunk_size=16 << 20, replication=1) as f:
        for i in range(0, len(data), 7 << 20):
            f.write(data[i : i + (7 << 20)])
    with client.open("/files/big.bin", "rb") as f:
        assert f.readable() and f.seekable() and not f.writable()
        assert f.read() == data
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:]
        # readinto fills a caller's buffer, across a chunk boundary.
        f.seek((16 << 20) - 3)
        buf = np.zeros(10, dtype=np.uint8)
        assert f.readinto(buf) == 10
        assert buf.tobytes() == data[(16 << 20) - 3 : (16 << 20) + 7]
        assert f.tell() == (16 << 20) + 7
        assert f.read(0) == b""


def test_a_write_that_raises_leaves_nothing(client):
    with pytest.raises(RuntimeError):
        with client.open("/files/partial.bin", "wb", replication=1) as f:
            f.write(b"half")
            raise RuntimeError("stop")
    with pytest.raises(FileNotFoundError):
        client.stat("/files/partial.bin")


def test_errors_are_the_exceptions_file_code_expects(client, tmp_path):
    with pytest.raises(FileNotFoundError, match="/nope"):
        client.stat("/nope")
    with pytest.raises(FileNotFoundError):
        client.open("/nope/x", "rb")
    client.mkdir("/dir")
    with pytest.raises(IsADirectoryError):
        client.open("/dir", "rb")
    src = tmp_path / "s"
    src.write_bytes(b"x")
    client.put(src, "/dir/s", replication=1)
    with pytest.raises(FileExistsError):
        client.put(src, "/dir/s", replication=1)
    client.put(src, "/dir/s", replication=1, overwrite=True)
    with pytest.raises(quern.QuernError, match="not empty|empty"):
        client.rm("/dir")
    client.mv("/dir/s", "/dir/t")
    assert [e["path"] for e in client.ls("/dir")] == ["/dir/t"]
    client.rm("/dir", recursive=True)
    with pytest.raises(FileNotFoundError):
        client.ls("/dir")
    with pytest.raises(ValueError):
        client.open("/x", "r+")


def test_a_user_without_rights_gets_permission_error(cluster, tmp_path):
    import subprocess
    from conftest import quern_bin

    r = subprocess.run(
        [quern_bin(), "cluster", "add-user", "--dir", str(cluster), "ana"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ana = quern.connect(cluster / "users" / "ana.toml")
    src = tmp_path / "f"
    src.write_bytes(b"mine")
    with pytest.raises(PermissionError):
        ana.put(src, "/not-hers.bin", replication=1)
    ana.put(src, "/user/ana/f", replication=1)
    assert ana.stat("/user/ana/f")["owner"] == "ana"


def test_connect_without_configuration_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("QUERN_CONFIG", raising=False)
    with pytest.raises(quern.QuernError, match="QUERN_CONFIG"):
        quern.connect()
