"""The Ray engine on a local CPU Ray (started once for the module): the same shards, bit for bit,
as the local engine, and the same rows as each sample encoded alone."""

from __future__ import annotations

import warnings

import pytest
import ray  # the ray extra: CI installs it (never skipped)
import torch

import atoken_rt
from atoken_rt.data import tokenize

from . import _data_inputs as di
from .conftest import WEIGHTS


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_ray_engine_equals_local_engine(ray_cluster, tmp_path):
    d = di.build(tmp_path / "in")
    kw = dict(device="cpu", shard_size=5, cpu_threads=1, readers=2)
    local = tokenize(d["sources"], tmp_path / "local", "tiny-sod", str(WEIGHTS), **kw)
    s = tokenize(d["sources"], tmp_path / "ray", "tiny-sod", str(WEIGHTS), engine="ray",
                 workers=2, cpus_per_worker=1, **kw)
    assert s.complete and s.shards_written == local.shards_written
    assert s.samples == local.samples and s.failures == local.failures
    assert di.table_dump(tmp_path / "ray") == di.table_dump(tmp_path / "local")
    assert sorted(di.failure_keys(tmp_path / "ray")) == sorted(di.failure_keys(tmp_path / "local"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference at the run's thread count (cpu_threads=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = atoken_rt.Session("tiny-sod", WEIGHTS, deterministic=True)
        di.assert_rows_equal(di.shard_rows(tmp_path / "ray"), di.reference_rows(sess, d["items"]))
    finally:
        torch.set_num_threads(threads)
    again = tokenize(d["sources"], tmp_path / "ray", "tiny-sod", str(WEIGHTS), engine="ray",
                     workers=2, cpus_per_worker=1, **kw)  # resume: nothing left to do
    assert again.shards_written == 0 and again.complete
