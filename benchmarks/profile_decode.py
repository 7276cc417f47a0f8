"""Profile a few decode steps of one method (torch.profiler): where the step's host and GPU time go.

    python benchmarks/profile_decode.py --method snapkv --case 131072x1 --budget 0.1
"""

import argparse

import torch

from sparse_hf.bench import _make_cache, build_model, parse_cases


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--case", default="131072x1")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    (length, batch), = parse_cases(a.case)
    dev = torch.device("cuda")
    model = build_model(a.model, dev, torch.bfloat16)
    if a.method == "vanilla":
        model.set_attn_implementation("sdpa")
    cache, _ = _make_cache(model, a.method, a.budget, length, a.steps + 8)
    ids = torch.randint(100, 1000, (batch, length), device=dev)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)

    def step(i):
        pos = torch.full((batch, 1), length + i, device=dev, dtype=torch.long)
        return model(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    for i in range(3):
        tok = step(i)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(a.steps):
            tok = step(3 + i)
        torch.cuda.synchronize()
    print(f"== {a.method} {a.case} budget {a.budget}: by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    print("== by device time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
