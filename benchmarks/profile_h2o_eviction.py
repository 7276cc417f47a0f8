"""Cost of the engine's H2O decode eviction alone (``ScoredModelRunner._evict_decode``): host ms per decode step and
top-level aten ops per call, on a narrow model with many layers (the op count of a per-layer loop grows with them).

    python benchmarks/profile_h2o_eviction.py                      # CPU: 28 layers, 4 rows, budget 256
    python benchmarks/profile_h2o_eviction.py --device cuda --rows 8 --budget 2048 --prompt 4096

On CUDA the ms include a device sync after the call (the eviction's own GPU time); the engine itself never syncs
there. Prints one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig

from sparse_hf.engine import LLM, SamplingParams


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                               max_position_embeddings=args.prompt + 256)
    llm = LLM(cfg, device=args.device, num_kv_slots=args.rows * (args.prompt + 64), max_model_len=args.prompt + 64,
              max_num_seqs=args.rows, chunk_prefill_size=min(args.prompt, 2048), sparse_method="h2o",
              num_sink_tokens=4, num_recent_tokens=64, num_top_tokens=args.budget - 68)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=3 * args.steps + 8, ignore_eos=True)
    for i in range(args.rows):
        llm.add_request(str(i), torch.randint(0, 512, (args.prompt,), generator=g).tolist(), params)
    while not all(len(r.output_token_ids) >= 1 for r in llm.requests.values()):
        llm.step()
    for _ in range(3):
        llm.step()
    inner = llm.runner._evict_decode
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    ms, ops = [], []

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        inner(*a, **k)
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)

    def counted(*a, **k):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            inner(*a, **k)
        ops.append(sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None))

    for wrapper in (timed, counted):
        llm.runner._evict_decode = wrapper
        for _ in range(args.steps):
            llm.step()
    print(json.dumps(dict(layers=args.layers, rows=args.rows, budget=args.budget, device=str(llm.device),
                          evict_ms_per_step=round(statistics.median(ms), 3),
                          aten_ops_per_step=statistics.median(ops))))
    llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
