"""bench/device_check.py's machinery on CPU: time-boxed steps that keep their output, budgets,
the summary built from partial results, and the clean exit without CUDA."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_shares_sum_to_one(dc):
    assert abs(sum(s for _, s in dc.STEPS) - 1.0) < 1e-9
    # a JSON per step (tests and the text steps: none) + summary.{json,md}: <= 8 files
    assert len([n for n, _ in dc.STEPS if n != "tests" and n not in dc.TEXT_STEPS]) + 2 <= 8


def test_time_box_kills_and_keeps_output(dc):
    """Output without a newline (pytest's dots) is kept, and the box is enforced."""
    code = "import time, sys; sys.stdout.write('..F.'); sys.stdout.flush(); time.sleep(60)"
    r = dc.run_boxed([sys.executable, "-c", code], timeout=2.0)
    assert r["timed_out"] and r["code"] is None
    assert r["lines"] == ["..F."] and r["seconds"] < 20
    rep = dc.run_step("tests", [sys.executable, "-c", code], timeout=1.0)
    assert not rep["ok"] and "time box" in rep["summary"] and "..F." in rep["summary"]


def test_step_exit_codes(dc):
    ok = dc.run_step("bench_x", [sys.executable, "-c", "print('row'); print('done')"], 30)
    assert ok["ok"] and ok["status"] == "ok" and ok["tail"] == ["row", "done"]
    bad = dc.run_step("bench_x", [sys.executable, "-c", "raise SystemExit(3)"], 30)
    assert not bad["ok"] and bad["status"] == "exit 3"
    missing = dc.run_step("bench_x", ["/nonexistent/python"], 30)
    assert not missing["ok"] and "FileNotFoundError" in missing["summary"]


def test_summary_from_partial_results(dc, tmp_path):
    """The summary lists every step so far, benchmark rows (errors too) and session rows, from
    whatever JSON files exist (a step killed by its box leaves none or a partial one)."""
    (tmp_path / "bench_attention.json").write_text(json.dumps({"rows": [
        {"workload": "L256", "provider": "triton", "tokens": 32768, "ms": 0.5, "tflops": 300.0,
         "gpu": "x", "commit": "c", "date": "d"},
        {"workload": "L256", "provider": "sdpa_cudnn", "error": "RuntimeError: no kernel"}]}))
    (tmp_path / "bench_rope.json").write_text("{ truncated")
    (tmp_path / "session.json").write_text(json.dumps({"rows": [
        {"backend": "triton", "graphs": True, "what": "warmup", "seconds": 12.0,
         "memory_gb": 1.5},
        {"backend": "triton", "graphs": True, "what": "encode image 256x256 b1", "p50_ms": 0.9,
         "p99_ms": 1.1, "tflops": 250.0},
        {"backend": "torch", "graphs": True, "what": "session", "error": "OOM"}]}))
    summary = {"date": "2026-11-29", "gpu": "NVIDIA H200", "commit": "abc", "torch": "2.11",
               "triton": "3.6", "budget_s": 420.0,
               "steps": {"bench_attention": {"summary": "ok", "seconds": 40.0},
                         "bench_rope": {"summary": "killed after 30s (time box)",
                                        "seconds": 30.0}}}
    text = dc.write_summary(tmp_path, summary)
    assert (tmp_path / "summary.md").read_text() == text
    assert json.loads((tmp_path / "summary.json").read_text())["commit"] == "abc"
    assert "| bench_rope | killed after 30s (time box) | 30.0 |" in text
    assert "tflops=300" in text and "error: RuntimeError: no kernel" in text
    assert "p50 0.900 ms" in text and "warmup | 12.0 s, 1.50 GB" in text and "OOM" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_cleanly_without_cuda(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--out",
                        str(tmp_path / "dc")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "no CUDA GPU" in p.stdout
    assert not (tmp_path / "dc").exists()


def test_host_overhead_bench_runs_on_cpu():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_host_overhead
    finally:
        sys.path.pop(0)
    rows = bench_host_overhead.measure("tiny-sod", "cpu", repeats=3)
    assert [r["case"].split(",")[0] for r in rows] == ["image 256x256 b1"] * 2 + \
        ["image 256x256 b8"]
    assert all(0 < r["min_ms"] <= r["p50_ms"] <= r["p99_ms"] for r in rows)


def test_time_box_kills_the_whole_step(dc, tmp_path):
    """A step's children die with it (pytest workers, a bench's helpers)."""
    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(marker)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
            "time.sleep(60)")
    r = dc.run_boxed([sys.executable, "-c", code], timeout=3.0)
    assert r["timed_out"] and "started" in r["lines"]
    import os
    import time
    pid = int(marker.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child outlived its time box")


def test_bench_rows_reach_disk_as_they_come(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    path = tmp_path / "b.json"
    rows = _common.JsonRows(str(path), "x", {"gpu": "g", "commit": "c", "date": "d"})
    rows.append({"case": 1})
    assert json.loads(path.read_text())["rows"] == [{"case": 1}]
    rows.append({"case": 2})
    assert [r["case"] for r in json.loads(path.read_text())["rows"]] == [1, 2]
    _common.JsonRows(None, "x", {}).append({"case": 3})  # no path: no file, no error


def test_session_step_runs_end_to_end_on_cpu(dc, tmp_path, monkeypatch):
    """The session step's whole logic (host overhead rows, warm-up of the buckets, every timed
    case, FLOP counts from the plan, JSON row by row), on the CPU with the tiny config."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    path = tmp_path / "session.json"
    rows = dc.session_latency(2, path, config="tiny-sod", device="cpu",
                              cases=["image 256x256 b1", "video 16x256x256 b1"],
                              combos=[("torch", True), ("torch", False)])
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(rows))
    assert not [r for r in rows if "error" in r], rows
    whats = [r["what"] for r in rows]
    assert whats[:3] == ["host overhead image 256x256 b1, same geometry",
                         "host overhead image 256x256 b1, new plan each call",
                         "host overhead image 256x256 b8, same geometry"]
    assert whats[3] == "warmup"
    timed = [r for r in rows if r["what"].startswith("encode")]
    assert len(timed) == 2 * 2 * 2  # combos x cases x (encode, encode+decode)
    video = [r for r in timed if "video" in r["what"]]
    assert all(r["tokens"] == 1024 for r in video)  # one 16-frame chunk: one 1024-token sequence
    assert all(r["p50_ms"] > 0 and r["tflops"] > 0 for r in timed)
    assert "p50" in dc.write_summary(tmp_path, {
        "date": "d", "gpu": "cpu", "commit": "c", "torch": "t", "triton": "t", "budget_s": 1.0,
        "steps": {}})


def test_main_orchestrates_steps_within_the_budget(dc, tmp_path, monkeypatch, capsys):
    """main() on a pretend GPU with stand-in steps: every step runs in order with its time box,
    a slow one is cut at its box, the budget leaves none unrun, and the summary lists them all."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    boxes = {}

    def fake_command(name, out, a):
        if name == "bench_rope":  # overruns its box
            return [sys.executable, "-c", "import time; print('rope...', flush=True); "
                    "time.sleep(60)"]
        if name in dc.TEXT_STEPS:  # a printed table, no file
            return [sys.executable, "-c", f"print('| {name} | table |')"]
        rows = json.dumps({"rows": [{"case": name, "ms": 1.0}]})
        return [sys.executable, "-c", f"open({str(out / (name + '.json'))!r}, 'w')"
                f".write({rows!r}); print('{name} done')"]

    real_run_step = dc.run_step

    def spy(name, cmd, timeout):
        boxes[name] = timeout
        return real_run_step(name, cmd, timeout)

    monkeypatch.setattr(dc, "step_command", fake_command)
    monkeypatch.setattr(dc, "run_step", spy)
    out = tmp_path / "dc"
    assert dc.main(["--out", str(out), "--budget", "40"]) == 0
    assert list(boxes) == [n for n, _ in dc.STEPS]
    assert boxes["bench_rope"] >= 40 * dict(dc.STEPS)["bench_rope"] - 1e-6  # at least its share
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds"] <= 40 + 5  # the boxes are carved out of what is left
    assert summary["gpu"] == "Pretend GPU"
    assert "time box" in summary["steps"]["bench_rope"]["summary"]
    assert all(summary["steps"][n]["ok"] for n, _ in dc.STEPS if n != "bench_rope")
    md = (out / "summary.md").read_text()
    assert "| bench_attention | case=bench_attention, ms=1.0 |" in md
    assert len(list(out.iterdir())) <= 8
    assert "## bench_render" in md and "| bench_stream | table |" in md


def test_time_box_holds_while_output_keeps_coming(dc):
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 1000 + '\\n')"
    r = dc.run_boxed([sys.executable, "-c", code], timeout=2.0)
    assert r["timed_out"] and r["seconds"] < 15


def test_step_that_exits_is_done_even_if_a_child_keeps_its_output(dc):
    """A finished step is reported at once with its exit code; its leftovers are killed."""
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print('done', flush=True)")
    r = dc.run_boxed([sys.executable, "-c", code], timeout=30.0)
    assert not r["timed_out"] and r["code"] == 0 and r["lines"] == ["done"]
    assert r["seconds"] < 10


def test_gpu_test_files_exist(dc):
    assert all((ROOT / f).is_file() for f in dc.GPU_TEST_FILES)
    assert dc.GPU_TEST_FILES[0] == "tests/test_gpu_graphs.py"


def test_steps_import_the_checkout_uninstalled(dc, tmp_path):
    """A bench script run by path imports atoken_rt from the checkout even where the package is
    not installed (the GPU machine runs the copied tree as is; the first GPU run failed every
    benchmark step on this): the steps' environment puts the checkout on the path."""
    import os
    env = dc._env()
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    code = ("import atoken_rt, pathlib; "
            "print(pathlib.Path(atoken_rt.__file__).resolve().parent.parent)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and Path(r.stdout.strip()) == ROOT, r.stderr[-2000:]
