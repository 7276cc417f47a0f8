"""The HF-path benchmark of issue 3: every method against HF vanilla and HF's best, on the H200.

    python benchmarks/bench_hf.py [--cases 4096x8,32768x2,131072x1] [--output bench_hf.json]

A thin wrapper over ``sparse-hf bench`` (one tool, one code path) with this benchmark's grid.
"""

import sys

from sparse_hf.cli import main

DEFAULTS = ["bench", "--model", "qwen2.5-7b", "--methods", "vanilla,hf-best,streamingllm,snapkv,pyramidkv,omnikv",
            "--budgets", "0.1,0.25", "--cases", "4096x8,32768x2,131072x1", "--output", "bench_hf.json",
            "--plot", "bench_hf.png"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))
