import numpy as np
import pytest

import quern


def test_from_numpy_and_back(client):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(500, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, size=500)
    ds = quern.Dataset.from_numpy(client, "/ds/u8", x, y, chunk_size=785 * 64, replication=2)
    info = ds.info()
    assert info["records"] == 500 and info["classes"] == 10
    assert info["feature_shape"] == [28, 28, 1]
    x2, y2 = ds.to_numpy()
    assert x2.dtype == np.uint8 and np.array_equal(x2, x)
    assert np.array_equal(y2, y)


def test_float_features_and_regression_targets(client):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 7)).astype(np.float64)
    y = rng.normal(size=300)
    ds = quern.Dataset.from_numpy(client, "/ds/f32", x, y, replication=1)
    assert ds.info()["label_dtype"] in ("f32", "float32")
    x2, y2 = ds.to_numpy()
    assert np.array_equal(x2, x.astype(np.float32))
    assert np.array_equal(y2, y.astype(np.float32))


def test_statistics_from_the_datanodes_equal_numpys(client):
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(1000, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=1000)
    ds = quern.Dataset.from_numpy(client, "/ds/stats", x, y, chunk_size=24 * 100, replication=1)
    s = ds.stats()
    assert s["count"] == 1000
    np.testing.assert_array_equal(s["min"], x.min(axis=0))
    np.testing.assert_array_equal(s["max"], x.max(axis=0))
    np.testing.assert_allclose(s["mean"], x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s["std"], x.astype(np.float64).std(axis=0), rtol=1e-9)
    np.testing.assert_array_equal(s["label_counts"], np.bincount(y, minlength=4))
    # MinMaxScaler from those statistics, without pulling the data.
    mm = ds.scaler("minmax").transform(x)
    np.testing.assert_allclose(mm.min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(mm.max(axis=0), 1.0, atol=1e-6)
    st = ds.scaler("standard").transform(x)
    np.testing.assert_allclose(st.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(st.std(axis=0), 1.0, atol=1e-5)
    # Keras's pixel recipe: the same values as x / 255 in every feature.
    px = ds.scaler("1/255")
    assert px.kind == "1/255"
    np.testing.assert_array_equal(px.transform(x), x / np.float32(255))
    with pytest.raises(ValueError, match="1/255"):
        ds.scaler("1/0")


def test_bad_arrays_are_refused_before_anything_is_stored(client):
    with pytest.raises(ValueError, match="labels"):
        quern.Dataset.from_numpy(client, "/ds/bad", np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="negative"):
        quern.Dataset.from_numpy(client, "/ds/bad", np.zeros((3, 2)), np.array([0, -1, 2]))
    with pytest.raises(FileNotFoundError):
        client.stat("/ds/bad")
    x = np.zeros((2, 2), dtype=np.uint8)
    quern.Dataset.from_numpy(client, "/ds/twice", x, np.array([0, 1]), replication=1)
    with pytest.raises(quern.QuernError, match="exists"):
        quern.Dataset.from_numpy(client, "/ds/twice", x, np.array([0, 1]), replication=1)
