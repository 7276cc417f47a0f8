"""DeltaKV compressor training: data packing, the HF Trainer loop, compressor-only checkpoints, resume, the CLI."""

import json
import os
import random
import string
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.trainer.cli import build_trainer, run
from sparse_hf.trainer.data import PackedCollator, build_train_dataset, load_documents, pack_documents
from sparse_hf.trainer.trainer import DeltaKVTrainingModel

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, bos_token_id=1, eos_token_id=2)
WORDS = "the cat sat on a mat while dogs ran over hills and birds sang in tall green trees".split()



def char_tokenizer():
    """An offline character-level tokenizer: <unk>=0, <s>=1, </s>=2, then printable characters."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set(string.printable) - set("\x0b\x0c")):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved to disk, and a small jsonl corpus."""
    root = tmp_path_factory.mktemp("deltakv_train")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))}) + "\n")
    return root


def argv(workdir, out, *extra):
    return ["--model", str(workdir / "model"), "--dataset", str(workdir / "docs.jsonl"), "--output_dir", str(out),
            "--kv_compressed_size", "16", "--block_size", "64", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--logging_steps", "5", "--use_cpu", "--disable_tqdm", "true",
            "--report_to", "none", *extra]


# -- data ---------------------------------------------------------------------------------------------------------------
def test_pack_documents_is_bos_text_eos_concatenated(tmp_path):
    import datasets

    tok = char_tokenizer()
    docs = datasets.Dataset.from_dict({"text": ["ab", "cde", "fg"]})
    packed = pack_documents(docs, tok, block_size=4, shuffle_seed=None)
    a, b, c, d, e, f, g = (tok.convert_tokens_to_ids(ch) for ch in "abcdefg")
    assert [list(x) for x in packed["input_ids"]] == [[1, a, b, 2], [1, c, d, e], [2, 1, f, g]]  # last </s> dropped
    batch = PackedCollator()([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].shape == (2, 3)


def write_source(tmp_path, fmt: str, texts: list[str]):
    """``texts`` as a local training source: ``txt`` (a line each), ``json`` (one array), ``jsonl`` (the even ones,
    one file of a two-file directory) or ``dir`` (that directory)."""
    if fmt == "txt":
        (tmp_path / "d.txt").write_text("\n".join(texts))
        return tmp_path / "d.txt"
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(texts)]))
        return tmp_path / "d.json"
    os.makedirs(tmp_path / "dir", exist_ok=True)
    for i in range(2):
        with open(tmp_path / "dir" / f"part{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i::2])
    return tmp_path / "dir" if fmt == "dir" else tmp_path / "dir" / "part0.jsonl"


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "dir"])
def test_local_sources(tmp_path, fmt):
    import datasets

    texts = [" ".join(WORDS[i:i + 6]) for i in range(10)]
    if fmt == "parquet":
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "d.parquet"))
        source = tmp_path / "d.parquet"
    else:
        source = write_source(tmp_path, fmt, texts)
    docs = load_documents(str(source))
    assert len(docs) == (5 if fmt == "jsonl" else 10)
    blocks = build_train_dataset(str(source), char_tokenizer(), block_size=16, max_blocks=3)
    assert len(blocks) == 3 and all(len(ids) == 16 for ids in blocks["input_ids"])


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "dir"])
def test_local_sources_without_datasets_pack_the_same_blocks(tmp_path, monkeypatch, fmt):
    """Without ``datasets`` (the GPU image), local text/JSON data gives the blocks ``datasets`` gives: same rows,
    same seed-42 shuffle, same packing per 1,000 documents."""
    texts = [" ".join(WORDS[i % len(WORDS):i % len(WORDS) + 1 + i % 5]) for i in range(2300)]
    source = write_source(tmp_path, fmt, texts)
    tok = char_tokenizer()
    reference = build_train_dataset(str(source), tok, block_size=32)
    monkeypatch.setitem(sys.modules, "datasets", None)   # import datasets -> ImportError
    docs = load_documents(str(source))
    assert type(docs).__name__ == "DocumentList" and len(docs) == (1150 if fmt == "jsonl" else 2300)
    blocks = build_train_dataset(str(source), tok, block_size=32)
    assert len(blocks) == len(reference) > 100
    assert blocks["input_ids"] == [list(x) for x in reference["input_ids"]]
    assert len(build_train_dataset(str(source), tok, block_size=32, max_blocks=7)) == 7
    (tmp_path / "d.csv").write_text("text\nabc\n")
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_documents(str(tmp_path / "d.csv"))


def test_data_errors(tmp_path, monkeypatch):
    import datasets

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_documents(str(tmp_path / "d.jsonl"))

    bad = tmp_path / "cut.jsonl"                           # a file cut mid-line (e.g. by `head -c`)
    bad.write_text(json.dumps({"text": "a b"}) + "\n" + '{"text": "c')
    with pytest.raises(ValueError, match="could not read it as json data"):
        load_documents(str(bad))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"cut.jsonl, line 2: not JSON"):
        load_documents(str(bad))
    monkeypatch.setitem(sys.modules, "datasets", datasets)

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match="pass a local .txt/.jsonl/.parquet file"):
        load_documents("HuggingFaceFW/fineweb-edu")


# -- training -------------------------------------------------------------------------------------------------------------
def test_training_lowers_loss_and_saves_only_the_compressor(workdir, tmp_path):
    trainer = build_trainer(argv(workdir, tmp_path / "out", "--max_steps", "30", "--save_strategy", "no",
                                 "--eval_blocks", "4"))
    model = trainer.model
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    with torch.no_grad():
        before = model(trainer.held_out)["loss"].item()
    trainer.train()
    with torch.no_grad():
        after = model(trainer.held_out)["loss"].item()
    assert after < before - 0.02, (before, after)
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base_before.items())  # base frozen

    trainer.save_model()
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("layers.") and (".down." in k or ".up." in k) for k in keys)
    loaded = DeltaKVCompressor.from_pretrained(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.compressor.state_dict().items())
    card = (out / "README.md").read_text()
    assert "| neighbor_count | 4 |" in card and "| steps | 30 |" in card


def test_sigterm_stops_after_the_step_and_saves_the_compressor(workdir, tmp_path, monkeypatch):
    """`timeout` sends SIGTERM: training ends after the current step and the compressor learned so far is saved,
    its record saying where it stopped (run S lost a 9-minute GPU run to `--save_strategy no` and a timeout)."""
    import signal

    from transformers import TrainerCallback

    from sparse_hf.trainer import cli

    class TermAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)      # delivered to the handler StopOnSignal installed

    built = cli.build_trainer

    def build_with_signal(*a, **k):
        trainer = built(*a, **k)
        trainer.add_callback(TermAtStep3())
        return trainer

    monkeypatch.setattr(cli, "build_trainer", build_with_signal)
    before, sigint_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    trainer = run(argv(workdir, tmp_path / "out", "--max_steps", "50", "--save_strategy", "no", "--eval_blocks", "2"))
    assert trainer.state.global_step == 4 and trainer.quality is None      # step 4 finished, no held-out check
    assert signal.getsignal(signal.SIGTERM) is before                      # the handler is gone after training
    saved = DeltaKVCompressor.from_pretrained(tmp_path / "out")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.compressor.state_dict().items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["training"]["steps"] == 4 and config["training"]["stopped"] == "SIGTERM after step 4 of 50"
    assert "SIGTERM after step 4 of 50" in (tmp_path / "out" / "README.md").read_text()

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    failing = built(argv(workdir, tmp_path / "fail", "--max_steps", "5", "--save_strategy", "no"))
    failing.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        failing.train()
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is sigint_before


def test_cli_run_resume_gives_the_same_compressor(workdir, tmp_path):
    common = ("--max_steps", "20", "--save_steps", "10", "--eval_blocks", "2")
    first = run(argv(workdir, tmp_path / "a", *common))
    assert os.path.isdir(tmp_path / "a" / "checkpoint-10")
    assert "perplexity (DeltaKV)" in first.quality
    assert "| perplexity (DeltaKV) | not measured |" not in (tmp_path / "a" / "README.md").read_text()
    resumed = run(argv(workdir, tmp_path / "b", *common, "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-10")))
    assert resumed.state.global_step == 20
    a = DeltaKVCompressor.from_pretrained(tmp_path / "a").state_dict()
    b = DeltaKVCompressor.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fresh = DeltaKVCompressor.from_pretrained(tmp_path / "a" / "checkpoint-10").state_dict()
    assert not all(torch.allclose(a[k], fresh[k]) for k in a)  # the resumed run did train further


def test_raw_pass_target_and_gradients_reach_only_the_compressor():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Qwen3Config(**TINY))
    comp = DeltaKVCompressor.for_model(base.config, kv_compressed_size=8, down_type="mlp_swiglu", intermediate_size=16)
    model = DeltaKVTrainingModel(base, comp, cluster_ratio=0.25, neighbor_count=2, mse_target="raw_pass")
    out = model(torch.randint(0, 128, (2, 40)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["recon_mse"] > 0
    assert all(p.grad is not None for p in comp.parameters())
    # down's output bias cancels in down(x) - down(ref): it is the only compressor tensor without a gradient
    assert {n for n, p in comp.named_parameters() if p.grad.abs().sum() == 0} == {f"layers.{i}.down.w3.bias" for i in (0, 1)}
    assert all(p.grad is None for p in base.parameters())
    with pytest.raises(ValueError, match="unpadded packed blocks"):
        model(torch.randint(0, 128, (1, 20)), attention_mask=torch.tensor([[0] * 5 + [1] * 15]))
    with pytest.raises(ValueError, match="mse_target"):
        DeltaKVTrainingModel(base, comp, mse_target="both")


@pytest.mark.parametrize("target", ["layer", "raw_pass"])
def test_gradient_checkpointing_gives_the_same_gradients(target):
    """Regression (raw_pass): the raw pass's targets were dropped at the end of forward, so the backward
    recomputation of a checkpointed layer compared against the same pass (gradients off by up to 8e-4)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
        model = DeltaKVTrainingModel(base, DeltaKVCompressor.for_model(base.config, kv_compressed_size=8),
                                     mse_target=target)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(torch.arange(80).remainder(128).view(2, 40))["loss"].backward()
        grads.append([p.grad.clone() for p in model.compressor.parameters()])
        model.release()
        assert "forward" not in vars(base.model.layers[0].self_attn)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# -- PCA initialization -------------------------------------------------------------------------------------------------
def _pca_setup(latent, balance="none"):
    from sparse_hf.trainer.pca_init import pca_initialize

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    comp = DeltaKVCompressor.for_model(base.config, kv_compressed_size=latent)
    model = DeltaKVTrainingModel(base, comp, num_sink=4, cluster_ratio=0.25, neighbor_count=2)
    blocks = torch.randint(3, 128, (6, 48))
    random_mse = model(blocks)["recon_mse"].item()
    pca_initialize(model, blocks, batch_size=4, balance=balance)
    return model, blocks, random_mse


def _per_coordinate_error(model, moments, layer):
    """``[D]`` float64 mean squared error of each coordinate of the layer's rebuilt ``x`` over the residuals
    ``d = x - ref`` (``x - recon = (I - P) d - b`` with ``P = up.W down.W``, ``b = up.b``), from their moments."""
    cov, total, count = moments[layer]
    second, mean = cov / count, total / count
    proj = model.compressor.layers[str(layer)]
    rest = torch.eye(second.shape[0], dtype=torch.float64) - proj.up.weight.double() @ proj.down.weight.double()
    b = proj.up.bias.double()
    err = rest @ second @ rest.T - torch.outer(rest @ mean, b) - torch.outer(b, rest @ mean) + torch.outer(b, b)
    return err.diagonal()


def test_pca_balance_kv_is_the_optimum_of_its_weighted_error():
    """Each init is the best rank-r map for its own error: the K/V-balanced one has the lower weighted error (both
    halves weigh the same), the plain one the lower plain error; at full rank both reconstruct exactly."""
    from sparse_hf.trainer.pca_init import half_weights, residual_moments

    plain, blocks, _ = _pca_setup(latent=8)
    balanced, _, _ = _pca_setup(latent=8, balance="kv")
    moments = residual_moments(plain, blocks)
    for layer in moments:
        cov, total, count = moments[layer]
        covariance = cov / count - torch.outer(total / count, total / count)
        w = half_weights(covariance, "kv")
        half = w.shape[0] // 2
        assert torch.allclose(w[:half] * covariance.diagonal()[:half].mean(), torch.ones(half, dtype=w.dtype))
        e_plain, e_bal = _per_coordinate_error(plain, moments, layer), _per_coordinate_error(balanced, moments, layer)
        assert (w * e_bal).sum() < (w * e_plain).sum() * (1 - 1e-6)
        assert e_plain.sum() < e_bal.sum() * (1 - 1e-6)
    full, blocks, random_mse = _pca_setup(latent=64, balance="kv")
    assert full(blocks)["recon_mse"].item() < 1e-9 < random_mse
    with pytest.raises(ValueError, match="--pca_balance 'qk'"):
        _pca_setup(latent=8, balance="qk")


def test_pca_init_full_rank_reconstructs_exactly():
    model, blocks, random_mse = _pca_setup(latent=64)  # D = 2 * (2 KV heads * 16) = 64: full rank
    assert model.compressor.config.kv_dim == 64
    assert model(blocks)["recon_mse"].item() < 1e-9 < random_mse


def test_pca_init_is_the_mse_optimum_among_nearby_weights():
    model, blocks, random_mse = _pca_setup(latent=8)
    pca_mse = model(blocks)["recon_mse"].item()
    assert pca_mse < 0.75 * random_mse
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.compressor.parameters():  # any small move of the rank-8 map adds error
            p.add_(1e-2 * torch.randn_like(p))
    assert model(blocks)["recon_mse"].item() > pca_mse


def test_cli_pca_init_starts_lower_and_is_recorded(workdir, tmp_path):
    losses = {}
    for init in ("random", "pca"):
        trainer = build_trainer(argv(workdir, tmp_path / init, "--max_steps", "1", "--init", init,
                                     "--init_blocks", "8", "--eval_blocks", "4"))
        with torch.no_grad():
            losses[init] = trainer.model(trainer.held_out)["recon_mse"].item()
    assert losses["pca"] < 0.75 * losses["random"], losses
    assert trainer.training_record()["init"].startswith("PCA of x - ref per layer (8 blocks")
    balanced = build_trainer(argv(workdir, tmp_path / "kv", "--max_steps", "1", "--init", "pca", "--pca_balance", "kv",
                                  "--init_blocks", "8", "--eval_blocks", "4"))
    assert balanced.training_record()["init"].startswith("PCA of x - ref per layer, K and V halves at equal variance")
    with pytest.raises(ValueError, match="--pca_balance 'qk'"):
        build_trainer(argv(workdir, tmp_path / "bad_balance", "--init", "pca", "--pca_balance", "qk"))
    with pytest.raises(ValueError, match="--init pca needs linear projections"):
        build_trainer(argv(workdir, tmp_path / "mlp", "--init", "pca", "--down_type", "mlp_gelu",
                           "--intermediate_size", "32"))
    with pytest.raises(ValueError, match="--init 'svd'"):
        build_trainer(argv(workdir, tmp_path / "bad", "--init", "svd"))


def test_ddp_training_with_two_processes(workdir, tmp_path):
    """The Trainer's own multi-process path (torchrun, DDP over gloo on CPU) trains and saves one compressor."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           "-m", "sparse_hf.trainer.cli", *argv(workdir, out, "--max_steps", "4", "--save_strategy", "no",
                                              "--ddp_backend", "gloo", "--per_device_train_batch_size", "1",
                                              "--logging_steps", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["steps"] == 4
    # each of the 4 steps consumed one block per process: the epoch counter shows 2 processes shared the data
    blocks = len(build_train_dataset(str(workdir / "docs.jsonl"), char_tokenizer(), 64))
    final = [line for line in result.stdout.splitlines() if "train_runtime" in line][-1]
    epoch = float(final.split("'epoch': '")[1].split("'")[0])
    assert abs(epoch - 4 * 2 / blocks) < 1e-3, (epoch, blocks)


# -- train/serve agreement -------------------------------------------------------------------------------------------------
def test_serving_uses_the_clustering_the_compressor_was_trained_with(workdir, tmp_path, monkeypatch):
    import sparse_hf
    from sparse_hf import SparseConfig
    from sparse_hf.deltakv import state as deltakv_state

    run(argv(workdir, tmp_path / "c", "--max_steps", "3", "--save_strategy", "no", "--cluster_metric", "cosine",
             "--cluster_ratio", "0.25", "--neighbor_count", "2"))
    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    caller = SparseConfig(full_attn_layers="0", num_recent_tokens=4, deltakv_path=str(tmp_path / "c"))
    before = caller.to_dict()
    cache = sparse_hf.DeltaKVCache(model.config, caller)
    served = cache.sparse_config
    assert (served.cluster_metric, served.num_sink_tokens, served.deltakv_neighbor_count, cache.method.step) == \
        ("cosine", 16, 2, 4)                                             # the training's, not 'l2' and 8 sinks
    assert caller.to_dict() == before                                    # the caller's config is unchanged
    as_dict = dict(full_attn_layers="0", num_recent_tokens=4, deltakv_path=str(tmp_path / "c"))
    cache = sparse_hf.DeltaKVCache(model.config, as_dict)
    assert (cache.sparse_config.cluster_metric, cache.sparse_config.num_sink_tokens) == ("cosine", 16)

    # the flushes really cluster with the cosine metric
    metrics = []
    real = deltakv_state.nearest_centers
    monkeypatch.setattr(deltakv_state, "nearest_centers",
                        lambda *a, **kw: metrics.append(a[5]) or real(*a, **kw))
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert metrics and set(metrics) == {"cosine"}

    # an explicit knob wins over the training record
    knobs = dict(full_attn_layers="0", num_recent_tokens=4, deltakv_path=str(tmp_path / "c"))
    cache = sparse_hf.DeltaKVCache(model.config, **knobs, cluster_metric="l2", num_sink_tokens=8)
    assert (cache.sparse_config.cluster_metric, cache.sparse_config.num_sink_tokens) == ("l2", 8)
    assert cache.sparse_config.deltakv_neighbor_count == 2
