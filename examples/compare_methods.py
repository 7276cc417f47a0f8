"""Run every sparse-hf method on the demo model (real SmolLM2-135M-Instruct) with one batched, left-padded
passkey prompt, and print each method's answers and KV memory against the full cache.

    python examples/compare_methods.py [--budget 0.25] [--tokens 1500]
"""

import argparse
import random
import time

import torch

import sparse_hf
from sparse_hf.models import load_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompts(tok, tokens, keys, depths):
    reps = tokens // len(tok(FILLER, add_special_tokens=False)["input_ids"])
    texts = []
    for key, depth in zip(keys, depths):
        cut = int(reps * depth)
        body = FILLER * cut + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (reps - cut)
        msg = f"A pass key is hidden in this text. Find it.\n{body}\nWhat is the pass key? Answer with the number."
        texts.append(tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                             add_generation_prompt=True))
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt each method keeps")
    ap.add_argument("--tokens", type=int, default=1500)
    a = ap.parse_args()
    model, tok = load_model("demo")
    rng = random.Random(0)
    keys = [str(rng.randint(10000, 99999)) for _ in range(2)]
    batch = passkey_prompts(tok, a.tokens, keys, depths=(0.25, 0.75))
    n = batch["input_ids"].shape[1]
    configs = {
        "full": None,
        "streamingllm": dict(num_sink_tokens=4, num_recent_tokens=int(a.budget * n)),
        "snapkv": dict(num_top_tokens=a.budget, num_sink_tokens=4, num_recent_tokens=64, window_size=32),
        "pyramidkv": dict(num_top_tokens=a.budget, num_sink_tokens=4, num_recent_tokens=64, window_size=32),
        "knorm": dict(num_top_tokens=a.budget, num_sink_tokens=4, num_recent_tokens=64),
        "omnikv": dict(num_top_tokens=a.budget, full_attn_layers="0,1,2,8,16"),
    }
    print(f"prompt: {n} tokens (batch of 2, left-padded), keys {keys}")
    for method, knobs in configs.items():
        kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        if knobs is not None:
            kw.update(cache_implementation=method, cache_config=knobs)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, **kw)
        answers = [t.strip() for t in tok.batch_decode(out.sequences[:, n:], skip_special_tokens=True)]
        usage = sparse_hf.kv_usage(out.past_key_values)
        found = sum(k in ans for k, ans in zip(keys, answers))
        print(f"{method:>13}: {found}/2 keys found, KV {100 * usage.ratio:5.1f}% of full, "
              f"{time.perf_counter() - start:5.1f} s  {answers}")


if __name__ == "__main__":
    main()
