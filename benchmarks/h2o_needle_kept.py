"""After prefill, the share of the needle value's token positions that each H2O ``score_normalization`` keeps, per
layer (mean over KV heads), and the share of the heavy hitters in the prompt's first quarter. One niah_single prompt
per depth at 2K on the demo model, budget 0.25 with the eval's cache_config (docs/accuracy.md). CPU, ~1 min."""
import torch
from sparse_hf.models import load_model
from sparse_hf.eval.tasks import build_samples
from sparse_hf.eval.runner import encode_sample
model, tok = load_model("demo", device="cpu")
cfg = {"num_sink_tokens": 4, "num_recent_tokens": 64, "num_top_tokens": 451}     # the eval's, 0.25 of 2,076
for depth in (0.1, 0.5, 0.9):
    s = build_samples("niah_single", tok, 2048, 1, 0, depth=depth)[0]
    ids = encode_sample(tok, s)
    val = s["answers"][0]
    toks = [tok.decode([t]) for t in ids[0].tolist()]
    text = "".join(toks)
    start = text.find(val)
    pos, acc = [], 0
    for i, t in enumerate(toks):
        if acc + len(t) > start and acc < start + len(val):
            pos.append(i)
        acc += len(t)
    row = [f"depth {depth} needle tokens {pos[0]}..{pos[-1]} of {ids.shape[1]}"]
    for mode in ("sum", "mean"):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                             cache_implementation="h2o", cache_config=dict(cfg, score_normalization=mode),
                             return_dict_in_generate=True)
        shares = []
        for layer in out.past_key_values.layers:
            p = layer.positions[0]                      # [Hkv, n]
            shares.append(sum(float(torch.isin(torch.tensor(pos), p[h]).float().mean()) for h in range(p.shape[0]))
                          / p.shape[0])
        kept = torch.cat([l.positions[0].flatten() for l in out.past_key_values.layers])
        mid = ((kept >= cfg["num_sink_tokens"]) & (kept < ids.shape[1] - cfg["num_recent_tokens"])).float()
        frac_first_quarter = float(((kept < ids.shape[1] // 4).float() * mid).sum() / mid.sum())
        row.append(f"{mode}: needle kept {sum(shares)/len(shares):.2f} (layers: "
                   + " ".join(f"{x:.1f}" for x in shares) + f"); heavy hitters in first quarter {frac_first_quarter:.2f}")
    print("\n  ".join(row), flush=True)
