"""The sparse-hf serving engine: continuous batching over a KV pool that sparse methods really free.

    from sparse_hf.engine import LLM, SamplingParams
"""

from .llm import LLM, SamplingParams
from .request import RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
