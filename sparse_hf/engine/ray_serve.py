"""Replicas on Ray Serve: each replica is one engine (one ``LLM`` on one node) behind the same OpenAI routes.

Ray spreads the requests over the replicas (and over the nodes of the Ray cluster); each replica runs the same
FastAPI app as ``sparse-hf serve`` (:func:`sparse_hf.engine.server.build_app`), so clients see one
OpenAI-compatible endpoint. Needs the optional extra: ``pip install "sparse-hf[ray]"`` (``ray[serve]``).

In Python::

    try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(f"{exc}; Ray Serve replicas need the 'ray' extra: pip install 'sparse-hf[ray]'") from exc
    from sparse_hf.engine.ray_serve import build_deployment
    serve.run(build_deployment("/models/Qwen2.5-7B-Instruct", num_replicas=4, num_gpus=1,
                               sparse_method="snapkv", num_top_tokens=2048), route_prefix="/")

From the shell (Ray's application builder; values are strings, JSON-decoded where they parse)::

    serve run sparse_hf.engine.ray_serve:app_builder model=/models/Qwen2.5-7B-Instruct num_replicas=4 \\
        num_gpus=1 sparse_method=snapkv num_top_tokens=2048
"""

from __future__ import annotations

import json
import os

from ray import serve

from .server import build_app

REPLICA_HEADER = "x-sparse-hf-replica"


@serve.ingress()
class SparseHFReplica:
    """One engine and its OpenAI app; Ray calls ``__serve_build_asgi_app__`` after ``__init__`` on the replica."""

    def __init__(self, model, llm_kwargs: dict, model_name: str, api_key: str | None = None):
        from .llm import LLM

        self.llm = LLM(model, **llm_kwargs)
        self.openai_app = build_app(self.llm, model_name, api_key)
        self.replica_id = f"{os.uname().nodename}:{os.getpid()}"

        @self.openai_app.middleware("http")
        async def tag_replica(request, call_next):   # which replica answered (for load checks and debugging)
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = self.replica_id
            return response

    def __serve_build_asgi_app__(self):
        return self.openai_app

    def __del__(self):   # Ray calls it when the replica stops: stop the engine thread
        if hasattr(self, "openai_app"):
            self.openai_app.state.server.close()


def build_deployment(model, *, num_replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                     served_model_name: str | None = None, api_key: str | None = None,
                     max_ongoing_requests: int = 256, **llm_kwargs):
    """A bound Ray Serve application: ``num_replicas`` engines of ``model`` (a directory reachable from every
    node, or an in-memory transformers model for tests), each with ``num_cpus``/``num_gpus``; ``llm_kwargs`` go
    to ``LLM`` (``max_model_len``, ``sparse_method``, the sparse knobs, ...)."""
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    name = served_model_name or (model if isinstance(model, str) else "sparse-hf")
    deployment = serve.deployment(SparseHFReplica, name="sparse-hf").options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return deployment.bind(model, llm_kwargs, name, api_key)


def _parse(value):
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value


def app_builder(args: dict):
    """``serve run sparse_hf.engine.ray_serve:app_builder model=... [key=value ...]``: the keys of
    :func:`build_deployment` and of ``LLM``."""
    args = {k: _parse(v) for k, v in args.items()}
    if "model" not in args:
        raise ValueError("app_builder needs model=<model directory>")
    return build_deployment(str(args.pop("model")), **args)
