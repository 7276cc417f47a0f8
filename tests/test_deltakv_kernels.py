"""The fused DeltaKV rebuild (``sparse_hf.kernels.deltakv_rebuild``): Triton (under the interpreter on CPU, on CUDA
with ``-m gpu``) and its torch reference against a float64 per-token oracle written from the formula: every latent
storage mode, GQA shapes, Qwen3's k_norm, rows with ``-1`` fillers and tokens without fathers."""

import pytest
import torch

from sparse_hf.deltakv.quant import QuantizedLatent, dequantize, quantize
from sparse_hf.kernels import HAS_TRITON, deltakv_gather_latents, deltakv_rebuild_kv, deltakv_writeback
from sparse_hf.kernels.deltakv_rebuild import rebuild_tile

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def make_case(B=2, Hkv=2, D=8, Dv=8, r=64, k=5, S=2, step=3, nbr=2, bits=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Dx = Hkv * (D + Dv)
    n_comp = 14                                   # compressed offsets per row (row 1 uses fewer through fillers)
    M = S + -(-n_comp // step)
    n_lat = n_comp - -(-n_comp // step)
    center_x = torch.randn(B, M, Dx, generator=g)
    fathers = torch.randint(0, M, (B, n_lat, nbr), generator=g)
    if n_lat > 1:
        fathers[0, 0] = -1                         # a token without any father: no reference
        fathers[1, 1, 0] = -1                      # one father missing: mean over the others
    latent = torch.randn(B, n_lat, r, generator=g)
    stored = quantize(latent, bits)
    pick = torch.stack([torch.randperm(n_comp, generator=g)[:k] for _ in range(B)])
    pick[1, -2:] = -1                              # a row with fewer picks
    pick[0, 0] = 3                                 # a center (3 % step == 0)
    pos = torch.randint(0, 500, (B, k), generator=g)
    w_up = torch.randn(Dx, r, generator=g) / r ** 0.5
    knorm = torch.rand(D, generator=g) + 0.5
    move = dict(device=device)
    return dict(center_x=center_x.to(**move), fathers=fathers.to(**move), stored=[None if t is None else t.to(**move)
                for t in stored], pick=pick.to(**move), pos=pos.to(**move), w_up=w_up.to(**move),
                knorm=knorm.to(**move), Hkv=Hkv, D=D, Dv=Dv, S=S, step=step)


def rope_tables(pos, D, dtype=torch.float64):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64, device=pos.device) / D))
    ang = pos.to(torch.float64).unsqueeze(-1) * inv
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def oracle(case, use_knorm):
    """Per token, in float64, straight from the formula."""
    c = {k: v.cpu() if torch.is_tensor(v) else v for k, v in case.items()}
    cx = c["center_x"].double()
    z_all = dequantize(QuantizedLatent(*[None if t is None else t.cpu() for t in c["stored"]]), torch.float64)
    B, k = c["pick"].shape
    Hkv, D, Dv, S, step = c["Hkv"], c["D"], c["Dv"], c["S"], c["step"]
    cos, sin = rope_tables(c["pos"], D)
    K = torch.zeros(B, Hkv, k, D, dtype=torch.float64)
    V = torch.zeros(B, Hkv, k, Dv, dtype=torch.float64)
    for b in range(B):
        for j in range(k):
            p = int(c["pick"][b, j])
            if p < 0:
                continue
            if p % step == 0:
                x = cx[b, S + p // step]
            else:
                row = p - p // step - 1
                f = [int(i) for i in c["fathers"][b, row] if i >= 0]
                ref = torch.stack([cx[b, i] for i in f]).mean(0) if f else torch.zeros_like(cx[b, 0])
                x = z_all[b, row] @ c["w_up"].double().T + ref
                if c.get("bias") is not None:
                    x = x + c["bias"].double()
            for h in range(Hkv):
                kh = x[h * D:(h + 1) * D]
                if use_knorm:
                    kh = kh / torch.sqrt(kh.pow(2).mean() + 1e-6) * c["knorm"].double()
                rot = torch.cat([-kh[D // 2:], kh[:D // 2]])
                K[b, h, j] = kh * cos[b, j] + rot * sin[b, j]
                V[b, h, j] = x[Hkv * D + h * Dv: Hkv * D + (h + 1) * Dv]
    return K, V


def run(case, backend, use_knorm, dtype=torch.float32):
    B, k = case["pick"].shape
    dev = case["center_x"].device
    k_out = torch.full((B, case["Hkv"], k, case["D"]), float("nan"), dtype=dtype, device=dev)
    v_out = torch.full((B, case["Hkv"], k, case["Dv"]), float("nan"), dtype=dtype, device=dev)
    cos, sin = rope_tables(case["pos"], case["D"], torch.float32)
    w = case["w_up"].to(dtype)
    codes, scale, offset = case["stored"]
    deltakv_rebuild_kv(case["pick"], codes.to(dtype) if scale is None else codes, scale, offset, case["fathers"],
                       case["center_x"].to(dtype), lambda z: z @ w.T, dtype, case["step"], case["S"], cos, sin,
                       k_out, v_out, case["knorm"] if use_knorm else None, 1e-6, backend=backend)
    return k_out, v_out


def check(got, want, pick, atol):
    live = (pick.cpu() >= 0).view(pick.shape[0], 1, pick.shape[1], 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.where(live, g.cpu().double(), 0.0), torch.where(live, w, 0.0),
                                   atol=atol, rtol=atol)


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rebuild_matches_float64_oracle(bits, backend):
    case = make_case(bits=bits)
    check(run(case, backend, use_knorm=False), oracle(case, False), case["pick"], 1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gqa_shapes_knorm_and_odd_widths(backend):
    # 3 KV heads, head dim 12 (half 6: not a power of two), V width 10, latent 96 (three 4-bit groups), k_norm
    case = make_case(B=3, Hkv=3, D=12, Dv=10, r=96, k=7, step=4, nbr=3, bits=4, seed=1)
    check(run(case, backend, use_knorm=True), oracle(case, True), case["pick"], 1e-4)


def test_gather_kernel_equals_reference_per_mode():
    for bits in (0, 8, 4):
        case = make_case(bits=bits, r=32 if bits != 4 else 64)
        codes, scale, offset = case["stored"]
        args = (case["pick"], codes, scale, offset, case["step"], torch.float32)
        torch.testing.assert_close(deltakv_gather_latents(*args, backend="triton"),
                                   deltakv_gather_latents(*args, backend="torch"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bits,r", [(0, 40), (8, 40), (4, 96), (4, 50)])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_kernel_tiles_match_float64_oracle(bits, r, block_m, device):
    # the two kernels at forced tiles: k = 7 picks per row (tiles of 4 end one pick in, a tile of 16 masks 9), -1
    # fillers, 3 KV heads of odd widths (half 6, V 10), k_norm, a bias in up; latents of 40 (int8 / float, padded to
    # 64), 96 (three 4-bit groups) and 50 (one 4-bit group of 50 values, not a power of two)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = make_case(B=2, Hkv=3, D=12, Dv=10, r=r, k=7, step=4, nbr=3, bits=bits, seed=2, device=device)
    case["bias"] = torch.randn(case["w_up"].shape[0], generator=torch.Generator().manual_seed(7)).to(device)
    B, k = case["pick"].shape
    codes, scale, offset = case["stored"]
    args = (case["pick"], codes, scale, offset, case["step"], torch.float32)
    z = deltakv_gather_latents(*args, backend="triton", block_m=block_m, num_warps=2)
    torch.testing.assert_close(z, deltakv_gather_latents(*args, backend="torch"))
    up_out = torch.nn.functional.linear(z, case["w_up"], case["bias"])
    k_out = torch.full((B, case["Hkv"], k, case["D"]), float("nan"), device=device)
    v_out = torch.full((B, case["Hkv"], k, case["Dv"]), float("nan"), device=device)
    cos, sin = rope_tables(case["pos"], case["D"], torch.float32)
    deltakv_writeback(case["pick"], up_out, case["fathers"], case["center_x"], case["step"], case["S"], cos, sin,
                      k_out, v_out, case["knorm"], 1e-6, backend="triton", block_m=block_m)
    check((k_out, v_out), oracle(case, True), case["pick"], 1e-4)


def test_rebuild_tile_heuristic_and_overrides():
    # the CPU counts as one SM (four programs wanted): the widest tile within 8,192 values, halved (not below 4
    # picks) while fewer than four programs run; one warp per 1,024 values, 2 to 8; overrides are kept as given
    assert rebuild_tile(1, 13039, 256, torch.device("cpu")) == (32, 8)
    assert rebuild_tile(1, 5, 1024, torch.device("cpu")) == (4, 4)            # 8 (k's power of two) gives 1 program
    assert rebuild_tile(2, 5, 16384, torch.device("cpu")) == (1, 8)           # rows wider than the tile budget
    assert rebuild_tile(1, 3, 64, torch.device("cpu")) == (4, 2)
    assert rebuild_tile(1, 100, 256, torch.device("cpu"), 4, 2) == (4, 2)
    with pytest.raises(ValueError, match="power of two"):
        rebuild_tile(1, 100, 256, torch.device("cpu"), 6)


def test_odd_four_bit_groups_are_refused():
    # the kernels dequantise a byte's two codes with one group's step: a group of an odd count of values is refused
    from sparse_hf.kernels.deltakv_rebuild import group_width
    assert group_width(96, torch.zeros(1, 1, 3), 4) == 32 and group_width(50, torch.zeros(1, 1, 1), 4) == 50
    assert group_width(96, torch.zeros(1, 1, 1), 8) == 1
    with pytest.raises(ValueError, match="even"):
        group_width(6, torch.zeros(1, 1, 2), 4)


@pytest.mark.parametrize("block_m", [None, 2])
def test_writeback_without_latents_reads_only_centers(block_m):
    # every compressed token a center (no latents yet): nothing but centers and RoPE (k = 5: tiles of 2 end in one)
    case = make_case(step=1)
    B, k = case["pick"].shape
    outs = []
    for backend in ("torch", "triton"):
        k_out = torch.zeros(B, case["Hkv"], k, case["D"])
        v_out = torch.zeros(B, case["Hkv"], k, case["Dv"])
        cos, sin = rope_tables(case["pos"], case["D"], torch.float32)
        outs.append(deltakv_writeback(case["pick"], None, None, case["center_x"], 1, case["S"], cos, sin,
                                      k_out, v_out, backend=backend, block_m=block_m))
    check(outs[1], [t.double() for t in outs[0]], case["pick"], 1e-5)


def test_writeback_into_strided_scratch_view():
    # the scratch slots are a view into a larger buffer (the layer's raw K/V buffer plus scratch slots)
    case = make_case(bits=8)
    B, k = case["pick"].shape
    buf_k = torch.zeros(B, case["Hkv"], 20 + k, case["D"])
    buf_v = torch.zeros(B, case["Hkv"], 20 + k, case["Dv"])
    cos, sin = rope_tables(case["pos"], case["D"], torch.float32)
    codes, scale, offset = case["stored"]
    w = case["w_up"]
    deltakv_rebuild_kv(case["pick"], codes, scale, offset, case["fathers"], case["center_x"], lambda z: z @ w.T,
                       torch.float32, case["step"], case["S"], cos, sin, buf_k[:, :, 20:], buf_v[:, :, 20:],
                       backend="triton")
    assert buf_k[:, :, :20].abs().sum() == 0 and buf_v[:, :, :20].abs().sum() == 0
    check((buf_k[:, :, 20:], buf_v[:, :, 20:]), oracle(case, False), case["pick"], 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(bits, dtype):
    case = make_case(B=4, Hkv=4, D=128, Dv=128, r=256, k=64, bits=bits, device="cuda")
    case["pick"] = torch.stack([torch.randperm(14, device="cuda")[:5] for _ in range(4)]).repeat(1, 13)[:, :64]
    got = run(case, "triton", True, dtype)
    want = run(case, "torch", True, dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage_raw_kernel_equals_the_four_copies(dtype):
    # a static step's raw slots and pick columns into the shared work buffer (wider than needed: its tail untouched),
    # with odd head widths and a raw buffer whose slot count is not a multiple of the kernel's block
    from sparse_hf.kernels import deltakv_stage_raw, deltakv_stage_raw_ref
    g = torch.Generator().manual_seed(4)
    B, Hkv, cap, s, D, Dv, L = 2, 3, 37, 11, 12, 10, 60
    k = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, cap, Dv, generator=g).to(dtype)
    pos = torch.randint(-1, 500, (B, Hkv, cap), generator=g)
    cols = torch.randint(-1, 500, (B, s), generator=g)
    outs = []
    for fn in (deltakv_stage_raw_ref, lambda *a: deltakv_stage_raw(*a, backend="triton")):
        kw = torch.full((B, Hkv, L, D), 7.0, dtype=dtype)
        vw = torch.full((B, Hkv, L, Dv), 7.0, dtype=dtype)
        pw = torch.full((B, Hkv, L), -5, dtype=torch.long)
        fn(k, v, pos, cols, kw[:, :, :cap + s], vw[:, :, :cap + s], pw[:, :, :cap + s])
        outs.append((kw, vw, pw))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    kw, vw, pw = outs[1]
    assert torch.equal(pw[:, :, cap:cap + s], cols.unsqueeze(1).expand(B, Hkv, s)) and (pw[:, :, cap + s:] == -5).all()


def _fused(case, use_knorm, bias=None, dtype=torch.float32, block_m=4):
    from sparse_hf.kernels.deltakv_fused import deltakv_rebuild_fused
    B, k = case["pick"].shape
    k_out = torch.full((B, case["Hkv"], k, case["D"]), float("nan"), dtype=dtype)
    v_out = torch.full((B, case["Hkv"], k, case["Dv"]), float("nan"), dtype=dtype)
    cos, sin = rope_tables(case["pos"], case["D"], torch.float32)
    codes, scale, offset = case["stored"]
    deltakv_rebuild_fused(case["pick"], codes.to(dtype) if scale is None else codes, scale, offset, case["fathers"],
                          case["center_x"].to(dtype), case["w_up"].to(dtype), bias, case["step"], case["S"], cos, sin,
                          k_out, v_out, case["knorm"] if use_knorm else None, 1e-6, block_m=block_m)
    return k_out, v_out


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_fused_rebuild_matches_float64_oracle(bits):
    # one kernel for a linear up (interpreted): every latent mode, a tile with masked picks (k=5, block 4), fillers
    from sparse_hf.kernels.dispatch import is_interpreted
    from sparse_hf.kernels.deltakv_fused import _fused_rebuild_kernel
    if not is_interpreted(_fused_rebuild_kernel):
        pytest.skip("needs TRITON_INTERPRET=1 before sparse_hf.kernels is imported")
    case = make_case(bits=bits)
    check(_fused(case, False), oracle(case, False), case["pick"], 1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5),
                                       pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.gpu)])
def test_fused_rebuild_gqa_knorm_bias_equals_the_two_kernel_path(dtype, tol):
    # odd widths (half 6, V 10, latent 96 in three 4-bit groups), k_norm, a bias; and the entry point's dispatch.
    # bf16 on CUDA only: the interpreter's tl.dot gives garbage for bf16 tiles (Triton 3.9, measured on this CPU)
    from sparse_hf.kernels.dispatch import is_interpreted
    from sparse_hf.kernels.deltakv_fused import _fused_rebuild_kernel
    dev = "cuda" if dtype == torch.bfloat16 else "cpu"
    if dev == "cpu" and not is_interpreted(_fused_rebuild_kernel):
        pytest.skip("needs TRITON_INTERPRET=1 before sparse_hf.kernels is imported")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = make_case(B=3, Hkv=3, D=12, Dv=10, r=96, k=7, step=4, nbr=3, bits=4, seed=1, device=dev)
    bias = torch.randn(case["w_up"].shape[0], generator=torch.Generator().manual_seed(5)).to(dev)
    B, k = case["pick"].shape
    outs = []
    for fused in (False, True):
        k_out = torch.full((B, case["Hkv"], k, case["D"]), float("nan"), dtype=dtype, device=dev)
        v_out = torch.full((B, case["Hkv"], k, case["Dv"]), float("nan"), dtype=dtype, device=dev)
        cos, sin = rope_tables(case["pos"], case["D"], dtype)
        codes, scale, offset = case["stored"]
        w, bw = case["w_up"].to(dtype), bias.to(dtype)
        deltakv_rebuild_kv(case["pick"], codes, scale, offset, case["fathers"], case["center_x"].to(dtype),
                           lambda z: torch.nn.functional.linear(z, w, bw), dtype, case["step"], case["S"],
                           cos, sin, k_out, v_out, case["knorm"], 1e-6, backend="triton" if fused else "torch",
                           up_linear=(w, bw) if fused else None)
        outs.append((k_out, v_out))
    live = (case["pick"] >= 0).view(B, 1, k, 1)
    for a, b in zip(*outs):
        torch.testing.assert_close(torch.where(live, b.float(), 0.0), torch.where(live, a.float(), 0.0), atol=tol,
                                   rtol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pick_index_kernels_equal_the_column_tables(backend):
    # the scores / columns a static step gets from comp_pos and each row's padding, against the per-flush column
    # tables they replace (comp_cols = comp_pos + pad, -1 where absent); rows with an absent tail
    from sparse_hf.kernels.deltakv_pick import deltakv_pick_columns, deltakv_pick_scores
    g = torch.Generator().manual_seed(6)
    B, N, L, k = 3, 40, 70, 9
    comp_pos = torch.randint(0, 50, (B, N), generator=g).int()
    comp_pos[1, 30:] = -1
    comp_pos[2, 5:] = -1
    off = torch.tensor([[0], [7], [19]])
    scores = torch.randn(B, L, generator=g)
    cols = (comp_pos.long() + off).masked_fill(comp_pos < 0, -1)
    want = scores.gather(1, cols.clamp(min=0)).masked_fill(cols < 0, float("-inf"))
    assert torch.equal(deltakv_pick_scores(scores, comp_pos, off, backend=backend), want)
    pick = want.topk(k, dim=-1).indices
    keep = torch.rand(B, k, generator=g) < 0.8
    got_cols, got_pos = deltakv_pick_columns(pick, keep, comp_pos, off, backend=backend)
    assert torch.equal(got_cols, cols.gather(1, pick).masked_fill(~keep, -1))
    assert torch.equal(got_pos, comp_pos.gather(1, pick).long())
    assert (got_cols[2] == -1).sum() >= k - 5                       # row 2 holds 5 tokens: the rest read nothing
