"""pytest-benchmark suite for the CPU-side pieces (opt-in: ATOKEN_BENCH=1; see bench/README.md)."""
