"""Where does SnapKV's prefill time go at 4096 x 8 (Qwen2.5-7B heads)? Times the score kernel, its torch reference
and the whole prefill_keep of one layer, bf16, on CUDA."""
import torch, triton
from sparse_hf.kernels import snapkv_prefill_scores
from sparse_hf.methods import get_method

B, H, Hkv, W, L, D = 8, 28, 4, 32, 4096, 128
dev = "cuda"
q = torch.randn(B, H, W, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
cand = torch.ones(B, Hkv, L, dtype=torch.bool, device=dev)
qv = torch.ones(B, W, dtype=torch.bool, device=dev)
for backend in ("triton", "torch"):
    f = lambda: snapkv_prefill_scores(q, k, cand, D ** -0.5, qv, backend=backend)
    f(); torch.cuda.synchronize()
    print(backend, "score ms", round(triton.testing.do_bench(f, return_mode="median"), 3))
cls = get_method("snapkv")
m = cls(cls.build_config(num_sink_tokens=4, num_recent_tokens=64, num_top_tokens=341, window_size=32)[0], 28)
valid = torch.ones(B, Hkv, L, dtype=torch.bool, device=dev)
g = lambda: m.prefill_keep(3, k, valid, q, qv, D ** -0.5)
g(); torch.cuda.synchronize()
print("prefill_keep ms", round(triton.testing.do_bench(g, return_mode="median"), 3))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        g()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
