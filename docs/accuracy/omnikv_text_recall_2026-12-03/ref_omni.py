"""Naive float64 reference of OmniKV decode on the HF model, with knobs and diagnostics (helper A, issue 14)."""
import json, sys, time, argparse
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

S = dict(mode="full", full=set(), obs=set(), sink=4, recent=64, top=455, score="softmax", tail=0, prompt_len=0,
         sel=None, stats=None, nlayers=30)

def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    if query.shape[2] > 1 or S["mode"] == "full":
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    i = module.layer_idx
    B, H, _, D = query.shape
    G = H // key.shape[1]
    k = key.double().repeat_interleave(G, 1); v = value.double().repeat_interleave(G, 1)
    logits = (query.double() @ k.transpose(-1, -2))[:, :, 0] * scaling          # [1,H,L]
    L = logits.shape[-1]
    probs = logits.softmax(-1)
    pos = torch.arange(L)
    prot = (pos < S["sink"]) | (pos >= L - S["recent"])
    if S["tail"]:
        prot |= (pos >= S["prompt_len"] - S["tail"])
    cand = ~prot
    sparse = S["mode"] in ("omni", "oracle") and i not in S["full"]
    if S["mode"] == "omni" and i in S["obs"] or S["mode"] == "oracle" and sparse:
        if S["score"] == "softmax":
            sc = logits.masked_fill(~cand, float("-inf")).softmax(-1).amax(1)[0]
        elif S["score"] == "raw":
            sc = logits.amax(1)[0]
        elif S["score"] == "fullprob":
            sc = probs.amax(1)[0]
        elif S["score"] == "meanprob":
            sc = probs.mean(1)[0]
        sc = sc.masked_fill(~cand, float("-inf"))
        top = min(S["top"], int(cand.sum()))
        keep = prot.clone()
        keep[sc.topk(top).indices] = True
        if cand.sum() <= S["top"]:
            keep[:] = True
        S["sel"] = keep
    if sparse and S["sel"] is not None:
        keep = S["sel"]
        if S["stats"] is not None:
            S["stats"].setdefault(i, []).append(float(probs[0][:, keep].sum(-1).mean()))
        logits = logits.masked_fill(~keep, float("-inf"))
        probs = logits.softmax(-1)
    out = (probs.unsqueeze(2) @ v)                                                # [1,H,1,D]
    return out.transpose(1, 2).to(query.dtype), None

AttentionInterface.register("refomni", attn)

def greedy(model, ids, n, eos):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            if toks[-1] in eos: break
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="full;omni")   # name=json;...
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--tasks", default="text_recall")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--out", default="ref.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from sparse_hf.models import load_model
    from sparse_hf.eval.tasks import build_samples
    from sparse_hf.eval.runner import encode_sample, budget_to_cache_config
    from sparse_hf.eval.text_recall import load_paragraphs
    model, tok = load_model("demo", dtype=torch.float32)
    model.set_attn_implementation("refomni")
    paras = load_paragraphs(None)
    samples = []
    for t in a.tasks.split(","):
        for d in ([None] if t == "text_recall" else [float(x) for x in a.depths.split(",")]):
            samples += build_samples(t, tok, 2048, a.n, 0, d, paragraphs=paras)
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    variants = [v.split("=", 1) if "=" in v else (v, "{}") for v in a.variants.split(";")]
    f = open(a.out, "a")
    for s in samples:
        ids = encode_sample(tok, s, "auto")
        L = ids.shape[1]
        cc = budget_to_cache_config("omnikv", a.budget, L)
        for name, js in variants:
            kn = json.loads(js)
            S.update(mode="full" if name == "full" else kn.get("mode", "omni"), sink=cc["num_sink_tokens"],
                     recent=cc["num_recent_tokens"], top=cc["num_top_tokens"], score="softmax", tail=0,
                     prompt_len=L, sel=None, stats={})
            fl = kn.get("full_layers", [0, 1, 2, 3, 8, 16, 22])
            S["full"] = set(fl); S["obs"] = {x for x in fl if x + 1 < 30 and x + 1 not in fl}
            for key in ("sink", "recent", "top", "score", "tail"):
                if key in kn: S[key] = kn[key]
            t0 = time.time()
            toks = greedy(model, ids, s["max_new_tokens"], eos)
            pred = tok.decode(toks, skip_special_tokens=True)
            sc = float(any(x.lower() in pred.lower() for x in s["answers"]))
            mass = {k: sum(v) / len(v) for k, v in S["stats"].items()} if S["stats"] else {}
            rec = dict(id=s["id"], variant=name, knobs=kn, budget=a.budget, pred=pred, answers=s["answers"], score=sc,
                       prompt_tokens=L, mass_mean=(sum(mass.values()) / len(mass)) if mass else None,
                       mass_by_layer={k: round(v, 3) for k, v in sorted(mass.items())}, seconds=round(time.time() - t0, 1))
            f.write(json.dumps(rec) + "\n"); f.flush()
            print(s["id"], name, sc, repr(pred[:60]), rec["mass_mean"] and round(rec["mass_mean"], 3), rec["seconds"], flush=True)

main()
