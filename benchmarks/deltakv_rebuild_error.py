"""How far DeltaKV's rebuilt K/V lie from the raw K/V the model computed, per layer (issue 12/14 diagnosis).

For each eval prompt (``sparse_hf.eval`` samples, chat template, as ``sparse-hf eval`` builds them):

1. one prefill with the DeltaKV HF cache (float32, CPU), with hooks on ``k_proj``/``v_proj`` of every layer that record
   the raw pre-RoPE ``x = concat(K, V)`` (the prefill attends raw tokens, so these are the model's own K/V);
2. per compressed layer, every compressed token rebuilt the way a decode step rebuilds it
   (:func:`sparse_hf.deltakv.state.rebuild_kv`, RoPE applied) and compared against the raw post-RoPE K/V of a full
   ``DynamicCache`` prefill at the same positions (relative Frobenius error of K and of V, and the MSE of ``x``, the
   trainer's per-layer loss);
3. a float64 reference of the same clustering (centers by position, fathers by
   :func:`~sparse_hf.deltakv.clustering.nearest_centers`, compressor cast to float64, no quantisation): its error, and
   how many fathers agree with the cache's;
4. the trainer's clustering of the same tokens (:func:`~sparse_hf.deltakv.clustering.cluster_reconstruct`, 16 sinks,
   packed block from position 0) for comparison with the training loss;
5. the same errors on the prompt's answer tokens alone (the needle's digits, the text to recall: where the sample's
   answer stands in the prompt), ``relK_ans``/``relV_ans``, and ``ans_pct``, the share of the other compressed
   tokens whose own relative error is below the answer tokens' mean (1.0: the answer is the worst rebuilt).

Usage (from the repository root or /tmp)::

    OMP_NUM_THREADS=1 python benchmarks/deltakv_rebuild_error.py --tasks niah_single --depths 0.5 --num-samples 1 \
        --cache-config '{"num_sink_tokens": 4, "num_recent_tokens": 64}' --json out.json

Prints one line per layer (averaged over the prompts) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def answer_positions(ids: list[int], tok, answers: list[str]) -> set[int]:
    """Prompt positions of the first answer whose tokens (with or without a leading space) stand in ``ids``."""
    for answer in answers:
        for text in (answer, " " + answer):
            sub = tok(text, add_special_tokens=False)["input_ids"]
            hits = [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]
            if sub and hits:
                return {h + j for h in hits for j in range(len(sub))}
    return set()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="niah_single")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--depths", default="0.5")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--model", default="demo", help="demo, qwen-coder or a local model path")
    p.add_argument("--deltakv-path", default="demo")
    p.add_argument("--compressor-dtype", default="file", help="file (as stored), float32 or float64")
    p.add_argument("--cache-config", default='{"num_sink_tokens": 4, "num_recent_tokens": 64}')
    p.add_argument("--corpus-file", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--oracle-ranks", default="96,192", help="ranks of the in-sample PCA lower bound")
    args = p.parse_args(argv)
    args.oracle_ranks = [int(r) for r in args.oracle_ranks.split(",")]

    import sparse_hf  # noqa: F401  (registers the caches)
    from transformers import DynamicCache

    from sparse_hf.deltakv.clustering import (cluster_reconstruct, compress, nearest_centers, reconstruct,
                                              reference_from_fathers)
    from sparse_hf.deltakv.compressor import DeltaKVCompressor
    from sparse_hf.deltakv.demo import resolve_compressor_path
    from sparse_hf.deltakv.state import all_offsets, rebuild, rebuild_kv
    from sparse_hf.eval.runner import encode_sample
    from sparse_hf.eval.tasks import build_samples
    from sparse_hf.eval.text_recall import load_paragraphs
    from sparse_hf.hf import build_cache, prepare_model
    from sparse_hf.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    prepare_model(model)
    comp = DeltaKVCompressor.from_pretrained(resolve_compressor_path(args.deltakv_path))
    if args.compressor_dtype != "file":
        comp = comp.to(getattr(torch, args.compressor_dtype))
    comp64 = DeltaKVCompressor.from_pretrained(resolve_compressor_path(args.deltakv_path)).to(torch.float64)
    knobs = json.loads(args.cache_config)
    cfg = model.config
    Hkv, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    raw_x: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: raw_x.setdefault(i, [None, None])
                                                       .__setitem__(0, o.detach())))
        hooks.append(attn.v_proj.register_forward_hook(lambda m, a, o, i=i: raw_x.setdefault(i, [None, None])
                                                       .__setitem__(1, o.detach())))

    samples = []
    for task in args.tasks.split(","):
        paragraphs = load_paragraphs(args.corpus_file) if task == "text_recall" else None
        depths = [None] if task == "text_recall" else [float(d) for d in args.depths.split(",")]
        for depth in depths:
            kw = {"paragraphs": paragraphs} if paragraphs is not None else {"depth": depth}
            samples += build_samples(task, tok, args.length, args.num_samples, 0, **kw)

    per_layer: dict[int, dict[str, list]] = {}
    meta = None
    t0 = time.time()
    for s in samples:
        ids = encode_sample(tok, s)
        raw_x.clear()
        cache = build_cache("deltakv", cfg, {**knobs, "compressor": comp})
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        xs = {i: torch.cat(v, -1)[0] for i, v in raw_x.items()}           # [n, Dx] pre-RoPE
        ref_cache = DynamicCache(config=cfg)
        with torch.no_grad():
            model(ids, past_key_values=ref_cache, use_cache=True)
        cl = cache.clustering
        answer_at = answer_positions(ids[0].tolist(), tok, s.get("answers") or [])
        meta = {"num_sink": cl.num_sink, "step": cl.step, "neighbor_count": cl.neighbor_count, "metric": cl.metric,
                "quant_bits": cl.quant_bits, "compressor_dtype": str(comp.projections.dtype),
                "full_attn_layers": list(cache.method.full_layers),
                "num_recent_tokens": cache.sparse_config.num_recent_tokens}
        for i, layer in enumerate(cache.layers):
            state = getattr(layer, "state", None)
            if state is None or not state.width:
                continue
            module = model.model.layers[i].self_attn
            pick, _ = all_offsets(state)
            xr, pos = rebuild(state, pick, comp.projections, i)                    # [1, N, Dx], [1, N]
            pos = pos[0]
            truth = xs[i][pos]                                                      # [N, Dx]
            k_r, v_r, _ = rebuild_kv(state, pick, comp.projections, i, Hkv, D, module.__dict__["_sparse_hf_rotary"])
            k_t = ref_cache.layers[i].keys[0][:, pos]                               # [Hkv, N, D] post-RoPE
            v_t = ref_cache.layers[i].values[0][:, pos]
            is_center = (pick[0] % cl.step == 0)
            lat = ~is_center
            rel = lambda a, b: float((a - b).detach().norm() / b.norm())                    # noqa: E731
            # float64 reference of the serving clustering: the same centers (sinks + every step-th offset)
            x64 = xs[i].double()
            sink_pos = torch.arange(cl.num_sink)
            c_pos = torch.cat([sink_pos, pos[is_center]])
            centers = x64[c_pos].unsqueeze(0)
            fa64 = nearest_centers(x64[pos].unsqueeze(0), centers, pos.unsqueeze(0), c_pos.unsqueeze(0),
                                   cl.neighbor_count, cl.metric)                     # [1, N, k]
            ref64 = reference_from_fathers(centers, fa64)
            rec64 = reconstruct(compress(x64[pos].unsqueeze(0), ref64, comp64.projections, i), ref64,
                                comp64.projections, i)[0]
            rec64[is_center] = x64[pos][is_center]
            row = (pick[0] - pick[0] // cl.step - 1)[lat]
            fa_cache = state.fathers[0, row].long()
            agree = float((torch.sort(fa_cache, -1).values == torch.sort(fa64[0, lat], -1).values).all(-1)
                          .float().mean())
            # the trainer's clustering on the packed prompt (16 sinks from position 0), rebuild of every tail token
            tr = cluster_reconstruct(x64[: int(pos.max()) + 1].unsqueeze(0), comp64.projections, i,
                                     num_sink=16, cluster_ratio=0.1, k=4, metric="l2")[0][pos]
            ref_only = ref64[0][lat]
            # oracle: the best rank-r affine map of this prompt's own residuals (in-sample PCA), a lower bound for
            # any linear latent-r compressor with these references
            resid = x64[pos][lat] - ref_only
            mu = resid.mean(0, keepdim=True)
            _, _, vh = torch.linalg.svd(resid - mu, full_matrices=False)
            oracle = {}
            for r in args.oracle_ranks:
                proj = (resid - mu) @ vh[:r].T @ vh[:r] + mu + ref_only
                oracle[r] = (rel(proj[:, :Hkv * D], x64[pos][lat][:, :Hkv * D]),
                             rel(proj[:, Hkv * D:], x64[pos][lat][:, Hkv * D:]))
            d = per_layer.setdefault(i, {})
            ans = torch.tensor([int(q) in answer_at for q in pos.tolist()]) & lat       # answer tokens, compressed
            if ans.any() and (lat & ~ans).any():
                per_token = (torch.cat([k_r[0] - k_t, v_r[0] - v_t], -1).norm(dim=(0, 2))
                             / torch.cat([k_t, v_t], -1).norm(dim=(0, 2)))             # [N] relative, per token
                d.setdefault("relK_ans", []).append(rel(k_r[0][:, ans], k_t[:, ans]))
                d.setdefault("relV_ans", []).append(rel(v_r[0][:, ans], v_t[:, ans]))
                d.setdefault("ans_pct", []).append(float((per_token[lat & ~ans] < per_token[ans].mean())
                                                         .float().mean()))
            for key, val in (
                ("relK", rel(k_r[0], k_t)), ("relV", rel(v_r[0], v_t)),
                ("relK_lat", rel(k_r[0][:, lat], k_t[:, lat])), ("relV_lat", rel(v_r[0][:, lat], v_t[:, lat])),
                ("mse_x", float((xr[0] - truth).pow(2).mean())),
                ("mse_x_lat", float((xr[0][lat] - truth[lat]).pow(2).mean())),
                ("mse_x64", float((rec64 - x64[pos]).pow(2).mean())),
                ("mse_trainer", float((tr - x64[pos]).pow(2).mean())),
                ("mse_ref_only", float((ref_only - x64[pos][lat]).pow(2).mean())),
                ("relK_ref", rel(ref_only[:, :Hkv * D], x64[pos][lat][:, :Hkv * D])),
                ("relV_ref", rel(ref_only[:, Hkv * D:], x64[pos][lat][:, Hkv * D:])),
                ("relK64", rel(rec64[lat][:, :Hkv * D], x64[pos][lat][:, :Hkv * D])),
                ("relV64", rel(rec64[lat][:, Hkv * D:], x64[pos][lat][:, Hkv * D:])),
                ("cache_vs_64", float((xr[0].double() - rec64).norm() / (rec64 - x64[pos]).norm().clamp_min(1e-30))),
                *[(f"relK_pca{r}", v[0]) for r, v in oracle.items()],
                *[(f"relV_pca{r}", v[1]) for r, v in oracle.items()],
                ("pos_ok", float(torch.equal(pos, torch.sort(pos).values) and int(pos[0]) == cl.num_sink)),
                ("father_agree", agree), ("N", float(pos.numel())), ("x_ms", float(truth.pow(2).mean())),
            ):
                d.setdefault(key, []).append(val)
        print(f"prompt {s['id']} ({ids.shape[1]} tokens) done at {time.time() - t0:.0f} s", flush=True)
    for h in hooks:
        h.remove()

    mean = {i: {k: sum(v) / len(v) for k, v in d.items()} for i, d in sorted(per_layer.items())}
    cols = ["relK", "relV", "relK_lat", "relV_lat", "relK_ref", "relV_ref", "relK64", "relV64", "mse_x", "mse_x64",
            "mse_trainer", "mse_ref_only", "cache_vs_64", "father_agree", "pos_ok", "x_ms"]
    cols += [f"rel{kv}_pca{r}" for r in args.oracle_ranks for kv in "KV"]
    cols += [c for c in ("relK_ans", "relV_ans", "ans_pct") if any(c in d for d in mean.values())]
    print("meta", json.dumps(meta))
    print("layer " + " ".join(f"{c:>10}" for c in cols))
    for i, d in mean.items():
        print(f"{i:5d} " + " ".join(f"{d.get(c, float('nan')):10.4g}" for c in cols))
    avg = {c: statistics.fmean(d[c] for d in mean.values() if c in d) for c in cols}   # the answer columns: the
    # layers that had answer tokens to compress (every column has at least one)
    print("mean  " + " ".join(f"{avg[c]:10.4g}" for c in cols))
    out = {"meta": meta, "prompts": [s["id"] for s in samples], "per_layer": mean, "mean": avg,
           "command_args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
