"""The cache keyword of the installed transformers: a forward call with it emits no deprecation warning and fills
the cache (transformers 5.25 renamed ``past_key_values`` to ``cache``; 5.17 has only ``past_key_values``)."""

import inspect
import warnings

import torch
from transformers import DynamicCache

from helpers import tiny_model
from sparse_hf.hf.compat import cache_argument


def test_the_cache_keyword_is_the_forward_s_own_and_warns_nothing():
    model = tiny_model("llama", layers=2)
    name = cache_argument(model.forward)
    assert name in inspect.signature(model.forward).parameters
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 3


def test_a_callable_without_a_signature_gets_the_old_name():
    assert cache_argument(len) == "past_key_values"
    assert cache_argument(lambda input_ids, cache=None: None) == "cache"
    assert cache_argument(lambda input_ids, past_key_values=None: None) == "past_key_values"
