"""What the kernel benchmarks (bench/bench_*.py) and bench/device_check.py share.

Run metadata (git commit, GPU, date), the CUDA-absent early exit, timing with
``triton.testing.do_bench``, the table header and time columns, the JSON file and the command line.
The scripts import this file as ``_common`` (they put bench/ on ``sys.path`` first, so that works
both when run as ``python bench/bench_x.py`` and when device_check.py loads them by file path).

torch and triton are imported inside the functions: device_check.py imports this module before it
imports torch, and TRITON_INTERPRET must be settled before triton is first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
QUANTILES = [0.5, 0.2, 0.8]
PEAK_GBS = 4300.0  # measured device-to-device copy on the H200 (ENGINEERING.md)


def commit() -> str:
    """Short hash of the checkout's HEAD, or "unknown"; ``ATOKEN_RT_COMMIT`` overrides it (the
    GPU machine gets a copy of the working tree without its git history)."""
    if os.environ.get("ATOKEN_RT_COMMIT"):
        return os.environ["ATOKEN_RT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (lscpu), for result files: speeds are only comparable on one CPU."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001 - no lscpu (macOS, containers): fall back below
        pass
    return platform.processor() or "unknown"


def no_cuda(name: str) -> bool:
    """True (after saying so in one line) when there is no CUDA GPU to measure on."""
    import torch
    if torch.cuda.is_available():
        return False
    print(f"bench_{name}: no CUDA GPU here; nothing measured (run it on the GPU machine).")
    return True


def metadata() -> dict:
    """The fields every row and JSON file carries: gpu, commit, date."""
    import torch
    return {"gpu": torch.cuda.get_device_name(), "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench(fn) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of fn by ``triton.testing.do_bench``."""
    from triton.testing import do_bench
    ms, ms20, ms80 = do_bench(fn, quantiles=QUANTILES)
    return ms, ms20, ms80


def rel_err(got, want) -> float:
    """||got - want|| / ||want||, both upcast to fp32."""
    return float((got.float() - want.float()).norm() / want.float().norm())


def max_rel_err(got, want) -> float:
    """The largest :func:`rel_err` over paired output tensors (tuples of the same length)."""
    return max(rel_err(a, b) for a, b in zip(got, want))


def measure(fns: dict, compare):
    """Per provider, in order: one untimed call, ``compare(provider, output)``, then the timing.

    Yields (provider, compare's result, ms, ms_p20, ms_p80, the "torch" provider's ms so far).
    """
    t_torch = None
    for provider, fn in fns.items():
        check = compare(provider, fn())
        ms, ms20, ms80 = bench(fn)
        t_torch = ms if provider == "torch" else t_torch
        yield provider, check, ms, ms20, ms80, t_torch


def bandwidth_row(op: str, shape: str, provider: str, nbytes: float, ms: float, ms20: float,
                  ms80: float, t_torch: float, check: tuple[str, Any], meta: dict) -> dict:
    """One result row of a memory-bound kernel: GB/s from the bytes it must move, its share of
    the measured peak, the speedup over torch and the accuracy check (name, value), bf16."""
    gbs = nbytes / ms * 1e-6
    return {"op": op, "shape": shape, "provider": provider, "ms": ms, "GB/s": gbs,
            "speedup_vs_torch": t_torch / ms, "pct_of_4.3TB/s": 100 * gbs / PEAK_GBS,
            "ms_p20": ms20, "ms_p80": ms80, check[0]: check[1], "dtype": "bf16", **meta}


def print_header(name: str, meta: dict, formula: str) -> None:
    """First table line: bench, GPU, commit, triton version; then the throughput formula."""
    import triton
    print(f"bench_{name}: {meta['gpu']}, commit {meta['commit']}, triton {triton.__version__}; "
          + formula)


def ms_header(width: int = 10) -> str:
    """Titles of the p50 and p20-p80 columns (as wide as :func:`ms_columns`)."""
    return f"{'ms p50':>{width}}{'p20-p80':>{2 * width - 2}}"


def ms_columns(row: dict, width: int = 10) -> str:
    """A row's p50 and p20-p80 times."""
    return (f"{row['ms']:>{width}.4f}{row['ms_p20']:>{width - 1}.4f}-"
            f"{row['ms_p80']:<{width - 2}.4f}")


def write_atomic(path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a kill mid-write leaves the old file whole)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(json_path: str | None, name: str, meta: dict, rows: list[dict]) -> None:
    """Write the rows with the metadata and versions to json_path (nothing when it is None)."""
    if not json_path:
        return
    import torch
    import triton
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, json.dumps({"bench": name, **meta, "torch": torch.__version__,
                                        "triton": triton.__version__, "rows": rows}, indent=1))


class JsonRows(list):
    """A list of result rows that rewrites its JSON file after every append, so a benchmark cut
    short (device_check's time box) keeps every row it finished. No file when json_path is None.
    """

    def __init__(self, json_path: str | None, name: str, meta: dict):
        super().__init__()
        self.json_path, self.name, self.meta = json_path, name, meta

    def append(self, row: dict) -> None:
        super().append(row)
        self.flush()

    def flush(self) -> None:
        """Rewrite the file (after rows already appended were updated in place)."""
        write_json(self.json_path, self.name, self.meta, list(self))


def main(run, doc: str, argv=None) -> int:
    """``python bench/bench_x.py [--json PATH]``: run(json_path) and exit 0."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows and metadata here")
    run(ap.parse_args(argv).json)
    return 0


def script(main) -> None:
    """The ``__main__`` entry: real kernels on a GPU (TRITON_INTERPRET dropped), exit main()."""
    import torch
    if torch.cuda.is_available():
        os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
