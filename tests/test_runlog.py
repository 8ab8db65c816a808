"""The HDF5 run log: committed rows only, torn appends ignored, config saved."""

import h5py
import numpy as np
import pytest

from es_mpi.runlog import IterationRecord, RunLog, RunLogError


def _record(it: int, n: int = 3) -> IterationRecord:
    return IterationRecord(
        it,
        np.arange(n) + 10 * it,
        np.ones(n, np.int8),
        np.linspace(0, 1, n),
        np.zeros(n),
        f"{it:064x}",
        {"evaluate": 1.0, "iteration": 1.5},
    )


def test_append_and_read(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", "seed: 1\n", "/m", "abc", population=3)
    for it in range(3):
        log.append(_record(it))
    data = log.read()
    assert data.iterations_done == 3
    assert data.attrs["config_yaml"] == "seed: 1\n" and data.attrs["model_sha256"] == "abc"
    np.testing.assert_array_equal(data.columns["member_seeds"][2], [20, 21, 22])
    assert data.checksums[1] == f"{1:064x}"
    assert data.columns["reward_max"][0] == 1.0 and data.columns["time_evaluate"][0] == 1.0
    assert np.isnan(data.columns["time_update"][0])  # not measured: NaN, not 0
    assert np.all(data.columns["wall_clock"] > 1.7e9)
    with pytest.raises(RunLogError):
        log.append(_record(7))  # out of order


def test_torn_append_is_ignored_and_cut(tmp_path):
    log = RunLog.create(tmp_path / "run.h5", "", "/m", "abc", population=3)
    log.append(_record(0))
    with h5py.File(log.path, "a") as f:  # a crash after resizing, before the commit counter
        f["rewards"].resize(2, axis=0)
    assert log.read().iterations_done == 1
    assert log.truncate_to_committed() == 1
    log.append(_record(1))
    assert log.read().iterations_done == 2


def test_not_a_log(tmp_path):
    (tmp_path / "run.h5").write_bytes(b"garbage")
    with pytest.raises(RunLogError):
        RunLog(tmp_path / "run.h5").read()
