"""Where do our caches part from ``DynamicCache`` at an unlimited budget on CUDA, and by how much?

For every method (bf16, the tiny random Llama of the tests, a left-padded batch), our cache is decoded along
DynamicCache's greedy tokens (teacher forcing) twice: on the default path (Triton decode kernels, CUDA graphs) and
with the Triton decode switched off (SDPA, as on CPU). One JSON line per (method, path): whether the prompt step's
logits are bitwise equal, the largest |ours - reference| logit difference over the decode steps (absolute and in
units of the largest |logit|), how many steps' argmax differ, and the largest reference margin at those steps.
These are the numbers behind ``BF16_TIE_REL`` in ``tests/test_gpu_hf.py``.

    python benchmarks/gpu_unlimited_diag.py [--new-tokens 24] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import greedy, left_padded_batch, tiny_model  # noqa: E402
from test_gpu_hf import teacher_forced_logits  # noqa: E402
from test_multiturn import configs as method_configs  # noqa: E402

from sparse_hf.hf import cache as hf_cache  # noqa: E402
from sparse_hf.hf import deltakv_cache as hf_deltakv_cache  # noqa: E402
from sparse_hf.hf import selection_cache as hf_selection_cache  # noqa: E402
from sparse_hf.methods import METHODS  # noqa: E402


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """``[B, n, V]`` logits on the same path -> the numbers of one report line."""
    diff = (ours - ref).abs()
    scale = ref.abs().amax(-1)                                            # [B, n]
    got, want = ours.argmax(-1), ref.argmax(-1)
    flips = (got != want).nonzero().tolist()
    margins = [float(ref[b, t, want[b, t]] - ref[b, t, got[b, t]]) / float(scale[b, t]) for b, t in flips]
    return {"prompt_step_bitwise": bool(torch.equal(ours[:, 0], ref[:, 0])),
            "bitwise_all": bool(torch.equal(ours, ref)),
            "max_abs_diff": float(diff.max()), "max_rel_diff": float((diff.amax(-1) / scale).max()),
            "max_abs_logit": float(scale.max()), "argmax_flips": len(flips), "steps": got.numel(),
            "max_rel_margin_at_flip": max(margins) if margins else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--methods", default=",".join(sorted(METHODS)))
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (both paths are then the torch path)")
    args = p.parse_args(argv)
    model = tiny_model("llama", layers=4).to(args.device, getattr(torch, args.dtype))
    ids, mask = left_padded_batch((56, 41))
    ids, mask = ids.to(args.device), mask.to(args.device)
    ref = greedy(model, ids, mask, new_tokens=args.new_tokens, output_logits=True, return_dict_in_generate=True)
    ref_logits = torch.stack(ref.logits, 1).float()
    for method in args.methods.split(","):
        knobs = method_configs(model, unlimited=True)[method]
        for path in ("triton+graphs", "sdpa-eager"):
            if path == "sdpa-eager":
                off = [mock.patch.object(m, "kernels_run_fused", lambda t: False)
                       for m in (hf_cache, hf_selection_cache, hf_deltakv_cache)]
                for patch in off:
                    patch.start()
                knobs = dict(knobs, cuda_graph=False)
            try:
                ours = teacher_forced_logits(model, ids, mask, ref.sequences, cache_implementation=method,
                                             cache_config=knobs)
            finally:
                if path == "sdpa-eager":
                    for patch in off:
                        patch.stop()
            print(json.dumps({"method": method, "path": path, "dtype": args.dtype, **compare(ours, ref_logits)}),
                  flush=True)


if __name__ == "__main__":
    main()
