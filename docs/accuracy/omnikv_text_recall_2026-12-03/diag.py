"""First sparse decode step of text_recall: where does the copy target sit in each layer's full attention, and is it
in OmniKV's selection (default vs calibrated filter layers)?"""
import json, sys, torch
import os
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ref_omni.py')).read().split("def main")[0])
from sparse_hf.models import load_model
from sparse_hf.eval.tasks import build_samples
from sparse_hf.eval.runner import encode_sample, budget_to_cache_config
from sparse_hf.eval.text_recall import load_paragraphs
torch.set_num_threads(1)
model, tok = load_model("demo", dtype=torch.float32)
model.set_attn_implementation("refomni")
samples = build_samples("text_recall", tok, 2048, 10, 0, None, paragraphs=load_paragraphs(None))
REC = {}
orig = attn
def rec_attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    if query.shape[2] == 1:
        G = query.shape[1] // key.shape[1]
        k = key.double().repeat_interleave(G, 1)
        REC[module.layer_idx] = ((query.double() @ k.transpose(-1, -2))[0, :, 0] * scaling)   # [H, L]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
AttentionInterface.register("rec", rec_attn)
model.set_attn_implementation("rec")
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 0.25
LAYOUTS = {"default": [0, 1, 2, 3, 8, 16, 22], "calib": [0, 3, 14, 17, 21, 27, 28]}
for si in [0, 2, 4, 8, 1, 3]:
    s = samples[si]
    ids = encode_sample(tok, s, "auto"); L = ids.shape[1]
    cc = budget_to_cache_config("omnikv", budget, L)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        g1 = int(out.logits[0, -1].argmax())
        out = model(input_ids=torch.tensor([[g1]]), past_key_values=cache, use_cache=True)
        g2 = int(out.logits[0, -1].argmax())
    p = ids[0].tolist()
    def run(j):   # tokens before the copy source that match the prompt's tail (the cue)
        n = 0
        while n < 20 and p[j - n] == p[L - 1 - n]:
            n += 1
        return n
    occ = sorted((j + 1 for j in range(L - 80) if p[j] == g1 and p[j + 1] == g2), key=lambda j: -run(j - 2))
    if not occ:
        print(si, "no occurrence of", tok.decode([g1, g2])); continue
    tgt = occ[0]
    Lk = L + 1
    pos = torch.arange(Lk)
    cand = (pos >= cc["num_sink_tokens"]) & (pos < Lk - cc["num_recent_tokens"])
    def select(layer):
        lg = REC[layer]
        sc = lg.masked_fill(~cand, float("-inf")).softmax(-1).amax(0).masked_fill(~cand, float("-inf"))
        keep = ~cand; keep[sc.topk(cc["num_top_tokens"]).indices] = True
        rank = int((sc > sc[tgt]).sum())
        return keep, rank
    print(f"sample {si}: copy target {tok.decode([g1])!r}->{tok.decode([g2])!r} at {tgt}/{L} (cue match {run(tgt - 2)} tokens), top={cc['num_top_tokens']}")
    probs = {l: REC[l].softmax(-1) for l in REC}
    line = []
    for l in range(30):
        pm = float(probs[l][:, tgt].max())
        line.append(f"{l}:{pm:.2f}")
    print("  max-head prob on target:", " ".join(line))
    for name, fl in LAYOUTS.items():
        miss = []
        sel = None
        for l in range(30):
            if l in fl:
                if l + 1 < 30 and l + 1 not in fl:
                    keep, rank = select(l); sel = (l, keep, rank)
                continue
            if not bool(sel[1][tgt]):
                miss.append(f"{l}(obs {sel[0]} rank {sel[2]}, p={float(probs[l][:, tgt].max()):.2f})")
        print(f"  {name}: target missing in", ", ".join(miss) or "none")
