"""The KV pool: allocation, release, per-head compaction, and no leak after many mixed requests with aborts and
preemption."""

import random

import pytest
import torch

from engine_helpers import run_mixed_requests
from helpers import tiny_model
from sparse_hf.engine import LLM
from sparse_hf.engine.kv_pool import KVPool


def make_pool(groups_per_layer=False, slots=16):
    return KVPool(num_layers=2, num_kv_heads=2, head_dim=4, num_slots=slots, max_rows=3, max_len=12,
                  per_layer_groups=groups_per_layer, dtype=torch.float32, device=torch.device("cpu"))


def test_allocate_writes_tables_and_release_returns_everything():
    pool = make_pool()
    mapping = pool.allocate([0, 2], [3, 2])                                   # [G=1, 5]
    assert mapping.shape == (1, 5) and len(set(mapping[0].tolist())) == 5
    assert pool.tables[0, 0, :3].tolist() == mapping[0, :3].tolist()
    assert pool.tables[0, 2, :2].tolist() == mapping[0, 3:].tolist()
    more = pool.allocate([2], [1])
    assert pool.tables[0, 2, 2].item() == more[0, 0].item() and pool.lens[0, 2] == 3
    assert pool.num_free() == 16 - 6 and pool.used_slots() == 2 * 6
    pool.release_row(0)
    pool.release_row(2)
    pool.check_whole()


def test_keep_compacts_per_head_and_frees():
    pool = make_pool(groups_per_layer=True)
    mapping = pool.allocate([1], [6])                                         # [G=2, 6]
    for layer in range(2):
        k = torch.arange(6 * 2 * 4, dtype=torch.float32).view(6, 2, 4) + 100 * layer
        pool.write(layer, mapping[layer], k, -k)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])                               # different tokens per KV head
    pool.keep(0, 1, idx)
    assert pool.lens[0, 1] == 3 and pool.lens[1, 1] == 6 and pool.free_top == [16 - 3, 16 - 6]
    slots = pool.tables[0, 1, :3].long()
    for h in range(2):
        expected = torch.arange(6 * 2 * 4, dtype=torch.float32).view(6, 2, 4)[idx[h], h]
        torch.testing.assert_close(pool.k[0][slots, h], expected)
        torch.testing.assert_close(pool.v[0][slots, h], -expected)
    pool.release_row(1)
    pool.check_whole()


def test_exhausted_pool_raises():
    pool = make_pool(slots=4)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate([0], [5])


@pytest.mark.parametrize("method,knobs,requests", [
    (None, {}, 1000),
    ("streamingllm", dict(num_sink_tokens=1, num_recent_tokens=3), 1000),
    ("snapkv", dict(num_sink_tokens=1, num_recent_tokens=4, num_top_tokens=2, window_size=2), 1000),
])
def test_pool_whole_after_many_mixed_requests(method, knobs, requests):
    """Short requests arrive in waves into a pool too small for all of them (so some are preempted); a random
    tenth are aborted at random points (waiting, prefilling or decoding). Afterwards every slot is free."""
    rng = random.Random(0)
    model = tiny_model("llama", layers=1 if method is None else 2)
    llm = LLM(model, num_kv_slots=48, max_model_len=40, max_num_seqs=8, chunk_prefill_size=4,
              max_num_batched_tokens=8, sparse_method=method, **knobs)
    finished, _ = run_mixed_requests(llm, rng, requests)
    assert len(finished) == requests
    assert sum(out.metrics["num_preemptions"] for out in finished.values()) > 0
    llm.pool.check_whole()
    assert sorted(llm.scheduler.free_rows) == list(range(8))


def test_graph_buckets():
    from sparse_hf.engine.graphs import batch_buckets, width_bucket

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3] and batch_buckets(1) == [1]
    assert [width_bucket(w, 5000) for w in (1, 256, 257, 4097)] == [256, 256, 512, 5000]
