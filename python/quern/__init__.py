"""quern from Python: files, datasets and their statistics on a quern cluster.

Connect with the same configuration the ``quern`` command uses, then work
with files and record-aligned datasets::

    import quern
    client = quern.connect()              # $QUERN_CONFIG, ~/.config/quern/client.toml
    client.put("local.bin", "/data/local.bin")
    with client.open("/data/local.bin", "rb") as f:
        header = f.read(16)
    ds = quern.Dataset.from_numpy(client, "/datasets/train", x, y)
    scaler = ds.scaler("minmax")          # from the statistics the datanodes compute

Every call releases the GIL while it waits on the cluster. Errors are the
exceptions file code expects (FileNotFoundError, FileExistsError,
PermissionError, IsADirectoryError), with quern's message; anything else is
a :class:`QuernError`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _quern
from ._quern import QuernError

__all__ = ["connect", "Client", "File", "Dataset", "Scaler", "QuernError"]

PathLike = Union[str, "os.PathLike[str]"]


def connect(config: Optional[PathLike] = None) -> "Client":
    """Connects to the cluster named by ``config``, else ``$QUERN_CONFIG``,
    else ``~/.config/quern/client.toml`` (what ``quern cluster up`` writes
    and prints)."""
    return Client(_quern.connect(None if config is None else os.fspath(config)))


class Client:
    """A connection to a quern cluster. Create it with :func:`connect`."""

    def __init__(self, inner: Any) -> None:
        self._c = inner

    def put(
        self,
        local: PathLike,
        remote: str,
        *,
        replication: Optional[int] = None,
        chunk_size: Optional[int] = None,
        overwrite: bool = False,
    ) -> Dict[str, Any]:
        """Stores local file ``local`` as ``remote`` (inside it, when it is a
        directory). The file appears whole or not at all. Returns its status."""
        return json.loads(
            self._c.put(os.fspath(local), remote, replication, chunk_size, overwrite)
        )

    def get(self, remote: str, local: PathLike) -> int:
        """Fetches ``remote`` into ``local``, checking every chunk's digest;
        returns the bytes written."""
        return self._c.get(remote, os.fspath(local))

    def ls(self, path: str = "/") -> List[Dict[str, Any]]:
        """The entries of a directory (for a file, its own status): dicts with
        ``path``, ``kind``, ``size``, ``replication``, ``owner``, ``mode``..."""
        return json.loads(self._c.ls(path))

    def stat(self, path: str) -> Dict[str, Any]:
        """A file's or directory's status (as in ``ls``)."""
        return json.loads(self._c.stat(path))

    def mkdir(self, path: str, parents: bool = True) -> None:
        """Creates a directory (and its parents, unless ``parents=False``)."""
        self._c.mkdir(path, parents)

    def rm(self, path: str, recursive: bool = False) -> None:
        """Removes a file, or a directory with ``recursive=True``."""
        self._c.rm(path, recursive)

    def mv(self, src: str, dst: str, replace: bool = False) -> None:
        """Renames ``src`` to ``dst`` (replacing a file there with ``replace``)."""
        self._c.mv(src, dst, replace)

    def fsck(self, path: str = "/") -> Dict[str, Any]:
        """The health of every file below ``path``: ``health``, counts of
        under-replicated, corrupt and missing chunks, and the files."""
        return json.loads(self._c.fsck(path))

    def report(self) -> Dict[str, Any]:
        """The cluster as ``quern report`` shows it: capacity, safe mode and
        every datanode (state, use, chunks, training jobs held)."""
        return json.loads(self._c.report())

    def locate(self, path: str) -> Dict[str, Any]:
        """A file's chunks with their offsets, sizes and replica holders."""
        return json.loads(self._c.locate(path))

    def open(
        self,
        path: str,
        mode: str = "rb",
        *,
        overwrite: bool = False,
        replication: Optional[int] = None,
        chunk_size: Optional[int] = None,
    ) -> "File":
        """Opens ``path`` as a binary file object: ``"rb"`` reads (with
        ``seek`` and ``readinto``), ``"wb"`` writes a new file that appears
        at ``close`` (and not at all if the ``with`` block raises)."""
        if mode in ("rb", "r"):
            return File(self._c.open_reader(path), None, path)
        if mode in ("wb", "w"):
            return File(None, self._c.open_writer(path, overwrite, replication, chunk_size), path)
        raise ValueError(f"mode {mode!r}: quern files open as 'rb' or 'wb'")


class File(io.RawIOBase):
    """A file of the cluster, opened by :meth:`Client.open`."""

    def __init__(self, reader: Any, writer: Any, path: str) -> None:
        super().__init__()
        self._r = reader
        self._w = writer
        self.name = path

    @property
    def mode(self) -> str:
        return "rb" if self._r is not None else "wb"

    def readable(self) -> bool:
        return self._r is not None

    def writable(self) -> bool:
        return self._w is not None

    def seekable(self) -> bool:
        return self._r is not None

    def readinto(self, buffer: Any) -> int:
        self._check_open("read")
        if self._r is None:
            raise io.UnsupportedOperation(f"{self.name}: opened for writing")
        # The caller's memory itself, written once: numpy checks that it is
        # one contiguous, writable block and keeps it exported meanwhile.
        target = np.frombuffer(buffer, dtype=np.uint8)
        if not target.flags.writeable:
            raise TypeError(f"readinto needs a writable buffer, not {type(buffer).__name__}")
        if target.nbytes == 0:
            return 0
        return self._r.readinto_address(target.ctypes.data, target.nbytes)

    def readall(self) -> bytes:
        self._check_open("read")
        if self._r is None:
            raise io.UnsupportedOperation(f"{self.name}: opened for writing")
        out = bytearray(max(self._r.size - self._r.tell(), 0))
        n = self.readinto(out)
        del out[n:]
        return bytes(out)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open("seek")
        if self._r is None:
            raise io.UnsupportedOperation(f"{self.name}: a file being written cannot seek")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._r.tell(), io.SEEK_END: self._r.size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"{self.name}: seek to {pos}, before the start")
        return self._r.seek(pos)

    def tell(self) -> int:
        self._check_open("tell")
        if self._r is None:
            raise io.UnsupportedOperation(f"{self.name}: a file being written has no position")
        return self._r.tell()

    def write(self, data: Any) -> int:
        self._check_open("write")
        if self._w is None:
            raise io.UnsupportedOperation(f"{self.name}: opened for reading")
        return self._w.write(bytes(data))

    def close(self) -> None:
        if not self.closed and self._w is not None:
            self._w.close()
        super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # A write cut short by an exception leaves nothing behind.
        if exc_type is not None and self._w is not None and not self.closed:
            self._w.abort()
            super().close()
            return None
        self.close()
        return None

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise ValueError(f"{what} on a closed file ({self.name})")


_DTYPES = {"u8": "<u1", "uint8": "<u1", "u32": "<u4", "uint32": "<u4", "f32": "<f4", "float32": "<f4"}


class Scaler:
    """Feature scaling as quern's training applies it: ``(x - offset) * factor``
    per feature (sklearn's MinMaxScaler or StandardScaler), fitted on the
    dataset statistics the datanodes computed, or ``x / d`` for ``"1/d"``
    (``"1/255"``: Keras's recipe for 8-bit pixels)."""

    def __init__(self, kind: str, offset: np.ndarray, factor: np.ndarray) -> None:
        self.kind = kind
        self.offset = offset
        self.factor = factor

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scales ``x`` (examples first, any feature shape) to float32."""
        x = np.asarray(x)
        if self.kind == "none":
            return x.astype(np.float32)
        flat = x.reshape(len(x), -1).astype(np.float32)
        if self.kind.startswith("1/"):
            # Divided as quern divides (and Keras's `x / 255.0`), not
            # multiplied by the nearest float to 1/d.
            return (flat / np.float32(int(self.kind[2:]))).reshape(x.shape)
        if flat.shape[1] != self.offset.shape[0]:
            raise ValueError(
                f"{flat.shape[1]} features per example, the scaler was fitted on {self.offset.shape[0]}"
            )
        return ((flat - self.offset) * self.factor).reshape(x.shape).astype(np.float32)

    def __repr__(self) -> str:
        if self.kind.startswith("1/"):
            return f"Scaler({self.kind!r})"
        return f"Scaler({self.kind!r}, {self.offset.shape[0]} features)"


class Dataset:
    """A record-aligned dataset directory on the cluster: every chunk holds
    whole records, so map tasks and training run where the chunks are."""

    def __init__(self, client: Client, path: str) -> None:
        self.client = client
        self.path = path

    @classmethod
    def from_numpy(
        cls,
        client: Client,
        path: str,
        x: np.ndarray,
        y: np.ndarray,
        *,
        chunk_size: Optional[int] = None,
        replication: Optional[int] = None,
    ) -> "Dataset":
        """Stores examples ``x`` (first axis: examples; uint8 kept, anything
        else as float32) with labels ``y`` (integers: class labels; floats:
        regression targets) as a new dataset at ``path``."""
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim < 1 or len(x) == 0:
            raise ValueError("x holds no examples")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} examples but {y.shape[0]} labels")
        y = y.reshape(len(y), -1)
        if y.shape[1] != 1:
            raise ValueError(f"one label per example, got {y.shape[1]}")
        n = len(x)
        shape = list(x.shape[1:]) or [1]
        fdt = "uint8" if x.dtype == np.uint8 else "float32"
        if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            if (y < 0).any():
                raise ValueError("class labels must not be negative")
            top = int(y.max())
            ldt = "uint8" if top < 256 else "uint32"
            classes = top + 1
        elif np.issubdtype(y.dtype, np.floating):
            ldt, classes = "float32", 0
        else:
            raise ValueError(f"labels of dtype {y.dtype}: use integers (classes) or floats")
        xb = np.ascontiguousarray(x.reshape(n, -1), dtype=_DTYPES[fdt]).view(np.uint8)
        yb = np.ascontiguousarray(y, dtype=_DTYPES[ldt]).view(np.uint8)
        records = np.concatenate([xb.reshape(n, -1), yb.reshape(n, -1)], axis=1).tobytes()
        client._c.import_records(path, records, shape, fdt, ldt, classes, chunk_size, replication)
        return cls(client, path)

    def info(self) -> Dict[str, Any]:
        """The manifest: record layout, record count, classes, parts, and
        the statistics once computed."""
        return json.loads(self.client._c.dataset_info(self.path))

    def stats(self) -> Dict[str, Any]:
        """Per-feature min, max, mean and std and the label counts, computed
        by map tasks on the datanodes that hold the chunks (and kept in the
        manifest)."""
        s = json.loads(self.client._c.dataset_stats(self.path))
        out: Dict[str, Any] = {"count": s["count"]}
        for k, dt in (("min", np.float32), ("max", np.float32), ("mean", np.float64), ("std", np.float64)):
            out[k] = np.asarray(s[k], dtype=dt)
        out["label_counts"] = np.asarray(s["label_counts"], dtype=np.int64)
        return out

    def to_numpy(self) -> Tuple[np.ndarray, np.ndarray]:
        """Every record, pulled here: ``(x, y)`` as stored."""
        m = self.info()
        rec = np.dtype(
            [
                ("x", _DTYPES[m["feature_dtype"]], tuple(m["feature_shape"])),
                ("y", _DTYPES[m["label_dtype"]]),
            ]
        )
        raw = np.frombuffer(self.client._c.dataset_records(self.path), dtype=rec)
        return np.array(raw["x"]), np.array(raw["y"])

    def scaler(self, kind: str = "minmax") -> Scaler:
        """The scaler quern's training fits (``"minmax"``, ``"standard"``,
        ``"none"`` or ``"1/255"``), from the distributed statistics: no data
        is pulled."""
        s = json.loads(self.client._c.dataset_scaler(self.path, kind))
        return Scaler(
            s["kind"],
            np.asarray(s["offset"], dtype=np.float32),
            np.asarray(s["factor"], dtype=np.float32),
        )

    def __repr__(self) -> str:
        return f"Dataset({self.path!r})"
