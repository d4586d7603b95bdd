"""atoken_rt.data.tokenize, local engine, on generated folders/WebDataset/Parquet/path lists.

Oracle: Session.encode of each sample (each 16-frame clip) alone, from inputs decoded by
PIL/media/tarfile/pyarrow outside the data package; shards read back with pyarrow alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import atoken_rt
from atoken_rt.data import read_tokens, tokenize

from . import _data_inputs as di
from .conftest import WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    d = di.build(root / "in")
    out = root / "out"
    s = tokenize(d["sources"], out, "tiny-sod", str(WEIGHTS), device="cpu", shard_size=4,
                 cpu_threads=torch.get_num_threads(), readers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sess = atoken_rt.Session("tiny-sod", WEIGHTS, deterministic=True)
    return {**d, "root": root, "out": out, "summary": s, "ref": di.reference_rows(sess, d["items"])}


def test_tokens_equal_each_sample_encoded_alone(data):
    di.assert_rows_equal(di.shard_rows(data["out"]), data["ref"])


def test_every_input_once_in_shards_or_failures(data):
    rows = di.shard_rows(data["out"])
    fails = di.failure_keys(data["out"])
    broken = {k for k, (kind, _) in data["items"].items() if kind == "broken"}
    assert sorted(fails) == sorted(broken)
    assert {k for k, _ in rows}.isdisjoint(fails)
    assert {k for k, _ in rows} | set(fails) == set(data["items"])
    s = data["summary"]
    assert s.complete and s.failures == len(broken) and s.samples == len(rows)
    man = json.loads((data["out"] / "manifest.json").read_text())
    assert man["num_items"] == len(data["items"])
    assert sum(e["rows"] for e in man["shards"]) == len(rows)
    assert sum(e["failures"] for e in man["shards"]) == len(broken)


def test_video_clips_and_ragged_tail(data):
    rows = di.shard_rows(data["out"])
    vid = str(data["root"] / "in" / "folder" / "vid0.mp4")
    assert [(rows[(vid, c)]["frame_start"], rows[(vid, c)]["frames_used"]) for c in (0, 1)] \
        == [(0, 16), (16, 4)]
    assert (vid, 2) not in rows


def test_manifest_hashes_and_read_tokens(data):
    out = data["out"]
    man = json.loads((out / "manifest.json").read_text())
    import hashlib
    for e in man["shards"]:
        assert hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"]
        assert pq.read_metadata(out / e["file"]).num_rows == e["rows"]
    ds = read_tokens(out, verify=True)
    rows = di.shard_rows(out)
    assert len(ds) == len(rows)
    key = str(data["root"] / "in" / "folder" / "img1.png")
    r = ds.find(key)
    assert (r.indices == rows[(key, 0)]["indices"]).all() and r.kind == "image"


def test_rerun_skips_everything(data):
    before = di.table_dump(data["out"])
    s = tokenize(data["sources"], data["out"], "tiny-sod", str(WEIGHTS), device="cpu",
                 shard_size=4, readers=2)
    assert s.shards_written == 0 and s.shards_skipped == s.shards_total and s.complete
    assert di.table_dump(data["out"]) == before


def test_changed_config_or_checkpoint_refused(data):
    kw = dict(device="cpu", shard_size=4)
    with pytest.raises(ValueError, match="another configuration.*config"):
        tokenize(data["sources"], data["out"], "tiny-soc", str(WEIGHTS), **kw)
    with pytest.raises(ValueError, match="another configuration.*checkpoint_sha256"):
        tokenize(data["sources"], data["out"], "tiny-sod", None, **kw)
    with pytest.raises(ValueError, match="not empty"):
        tokenize(data["sources"], data["root"] / "in" / "extra", "tiny-sod", str(WEIGHTS), **kw)


_KILLER = """
import os, signal, sys, torch
import atoken_rt.data.api as api
calls = [0]
orig = api.write_manifest
def write_manifest(out, m):
    calls[0] += 1
    if calls[0] == 3:  # shard 1 is committed, its manifest update is not: die here
        os.kill(os.getpid(), signal.SIGKILL)
    orig(out, m)
api.write_manifest = write_manifest
api.tokenize(sys.argv[2:], sys.argv[1], "tiny-sod", {w!r}, device="cpu", shard_size=2,
             cpu_threads={t}, readers=2)
"""


def test_resume_after_sigkill(data, tmp_path):
    out = tmp_path / "killed"
    code = _KILLER.format(w=str(WEIGHTS), t=torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code, str(out), *data["sources"]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    man = json.loads((out / "manifest.json").read_text())
    assert not man["complete"] and len(man["shards"]) == 1  # the killed run's view
    assert len(list(out.glob("shard-*.parquet"))) == 2
    s = tokenize(data["sources"], out, "tiny-sod", str(WEIGHTS), device="cpu", shard_size=2,
                 cpu_threads=torch.get_num_threads(), readers=2)
    assert s.complete and s.shards_skipped == 2 and s.shards_written == s.shards_total - 2
    di.assert_rows_equal(di.shard_rows(out), data["ref"])  # each row exactly once, same bits
    assert sorted(di.failure_keys(out)) == sorted(di.failure_keys(data["out"]))
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*.parquet*"))


def test_cli_tokenize_and_decode_a_key(data, tmp_path, capsys):
    from atoken_rt.cli import main
    out = tmp_path / "cli"
    folder = data["root"] / "in" / "extra"
    assert main(["tokenize", str(folder), "--out", str(out), "--config", "tiny-sod",
                 "--checkpoint", str(WEIGHTS), "--device", "cpu", "--shard-size", "1",
                 "--quiet"]) == 0
    assert "2 sample(s)" in capsys.readouterr().out
    key = str(folder / "listed1.png")
    shard = next(p for p in sorted(out.glob("shard-*.parquet"))
                 if key in pq.read_table(p, columns=["key"])["key"].to_pylist())
    assert main(["decode", str(shard), "--key", key, "--out", str(tmp_path / "dec"),
                 "--quiet"]) == 0
    assert len(list((tmp_path / "dec").glob("*.png"))) == 1
    assert main(["decode", str(shard), "--key", "nope", "--out", str(tmp_path / "d2")]) == 2
    assert main(["tokenize", str(folder), "--out", str(out), "--config", "tiny-soc",
                 "--device", "cpu", "--shard-size", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "Traceback" not in err
