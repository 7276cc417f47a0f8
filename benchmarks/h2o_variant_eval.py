"""Experiment harness (docs/accuracy.md, H2O's score normalisation): ``sparse-hf`` with H2O variants that are not
knobs, patched in for one run. Usage: ``python benchmarks/h2o_variant_eval.py MODS eval ...`` where MODS is a comma
list of ``window`` (prefill scores from the last 128 prompt queries only, as KVCache-Factory's and Sparse-vLLM's H2O:
the other prompt queries are masked out of the mass; assumes one prefill forward per prompt, the eval's case) and
``layer`` (one selection per layer: the scores summed over the KV heads rank every head's tokens); the rest are
``sparse-hf`` arguments. HF path only."""
import sys
import sparse_hf.hf.cache as C
from sparse_hf.methods.h2o import H2O
mods = sys.argv[1].split(",")
if "window" in mods:
    _orig = C.query_validity
    def windowed(attention_mask, q_len, seen, batch, device):
        qv = _orig(attention_mask, q_len, seen, batch, device)
        if q_len > 1:
            qv = qv.clone()
            qv[:, : max(q_len - 128, 0)] = False
        return qv
    C.query_validity = windowed
if "layer" in mods:
    _keep = H2O._keep
    def shared(self, valid, scores, budget, positions):
        return _keep(self, valid, scores.sum(1, keepdim=True).expand_as(scores), budget, positions)
    H2O._keep = shared
from sparse_hf.cli import main
sys.exit(main(sys.argv[2:]))
