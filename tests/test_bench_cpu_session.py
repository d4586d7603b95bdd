"""bench/bench_cpu_session.py end to end on the tiny config (structure and accuracy, never speed):
every input gets its GEMM and attention floors, and every attention alternative it times agrees
with an fp64 computation as closely as bf16 inputs allow."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_cpu_session.py"


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_cpu_session", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    mod.main(["--config", "tiny-sod", "--quick", "--repeats", "1", "--json", str(out)])
    return json.loads(out.read_text())


def test_every_input_has_both_floors(bench_json):
    rows = [r for r in bench_json["rows"] if r["section"] == "bf16"]
    inputs = {r["input"] for r in rows}
    assert inputs == {"image 256x256", "image 512x512", "video 16x256x256"}
    for name in inputs:
        got = {r["measurement"] for r in rows if r["input"] == name}
        for stage in ("encode", "decode"):
            assert {f"{stage} before", f"{stage} after",
                    f"{stage} GEMM floor (prepacked oneDNN)",
                    f"{stage} attention floor (flash SDPA)"} <= got
    assert all(r["seconds"] > 0 for r in rows)


def test_attention_alternatives_match_fp64(bench_json):
    rows = [r for r in bench_json["rows"] if r["section"] == "attention"]
    names = {r["measurement"] for r in rows}
    assert "blocked GEMMs (fp32 scores, bf16 P)" in names and "SDPA bf16 (flash, fast path)" in names
    for r in rows:
        # bf16 inputs and output: ~2^-9 relative per element; a wrong kernel is off by O(1).
        assert r["rel_err_vs_fp64"] < 5e-3, r
