"""The row cache's column readers (search_ui.rowcache): the values Arrow's take().to_pylist() gives."""

import datetime

import numpy as np
import pyarrow as pa

from search_ui.rowcache import _column_reader


def test_column_readers_equal_arrow_take():
    rng = np.random.default_rng(0)
    n = 300
    null = rng.random(n) < 0.2
    columns = [
        pa.array([f"s{i}é✓" if i % 7 else "" for i in range(n)]),
        pa.array([None if null[i] else f"x{i}" for i in range(n)]),
        pa.array([None if null[i] else f"x{i}" for i in range(n)], pa.large_string()),
        pa.array([None] * n, pa.string()),
        pa.array(rng.normal(size=n).astype(np.float32)),
        pa.array([None if null[i] else i / 3 for i in range(n)], pa.float32()),
        pa.array([None if null[i] else i / 3 for i in range(n)], pa.float64()),
        pa.array([None if null[i] else i for i in range(n)], pa.int64()),
        pa.array(list(range(n)), pa.uint16()),
        pa.array([None if null[i] else bool(i % 3) for i in range(n)]),
        pa.array([bool(i % 3) for i in range(n)]),
        pa.array([datetime.datetime(2020, 1, 1 + i % 28) for i in range(n)]),  # the Arrow path
        pa.array([[i, i + 1] for i in range(n)]),
        pa.array([f"x{i}" for i in range(n)]).dictionary_encode(),
        pa.array([None if null[i] else f"x{i}" for i in range(n)]).slice(37, 200),  # offset into buffers
        pa.array([None if null[i] else i for i in range(n)]).slice(11, 200),
    ]
    for arr in columns:
        read = _column_reader(arr)
        for _ in range(20):
            rows = rng.integers(0, len(arr), int(rng.integers(0, 12)))
            want = arr.take(pa.array(rows, pa.int64())).to_pylist()
            got = read(rows)
            assert got == want and [type(v) for v in got] == [type(v) for v in want], arr.type
    assert _column_reader(pa.array([], pa.string()))(np.zeros(0, np.int64)) == []
