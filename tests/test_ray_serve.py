"""Two Ray Serve replicas of a tiny model on a local Ray instance (CPU), behind the same OpenAI routes.

Skips when ``ray[serve]`` is not installed (the optional ``ray`` extra)."""

import concurrent.futures
import os

import httpx
import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    import ray
    from ray import serve

    from sparse_hf.engine.ray_serve import build_deployment
    from tiny_tokenizer import free_port, save_tiny_chat_model

    path = save_tiny_chat_model(tmp_path_factory.mktemp("ray-tiny-model"), seed=3)
    port = free_port()
    # On a loaded 2-core CI box the HTTP proxy actor can take longer to start than Serve's checks allow (seen once
    # in a bare-Python CI run: the controller killed the proxy before it ran and serve.start failed). Give its
    # ready and health checks (read by the controller, from the environment the local cluster inherits) and
    # serve.start's own 60 s wait more time.
    slow = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    for name, value in slow.items():
        os.environ.setdefault(name, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **slow}})
    import ray.serve._private.api as serve_api

    if hasattr(serve_api, "HTTP_PROXY_TIMEOUT"):
        serve_api.HTTP_PROXY_TIMEOUT = max(serve_api.HTTP_PROXY_TIMEOUT, 300)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_deployment(path, num_replicas=2, num_cpus=0.5, served_model_name=MODEL,
                               max_model_len=128, num_kv_slots=1024, max_num_seqs=4)
        serve.run(app, name="sparse-hf", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_openai_requests(ray_app):
    from sparse_hf.engine.ray_serve import REPLICA_HEADER

    oai = openai.OpenAI(base_url=ray_app + "/v1", api_key="none", max_retries=0, timeout=120,
                        http_client=httpx.Client(trust_env=False, timeout=120))

    def one(i):
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt=f"Hello {i}", max_tokens=4, temperature=0,
                                                       extra_body={"ignore_eos": True})
        return raw.headers[REPLICA_HEADER], raw.parse()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(24)))
    assert all(out.usage.completion_tokens == 4 for _, out in results)
    assert len({replica for replica, _ in results}) == 2, "both replicas should have answered"
    same_prompt = {one(0)[1].choices[0].text for _ in range(6)}
    assert same_prompt == {results[0][1].choices[0].text}, "replicas must be the same engine (greedy agrees)"
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        oai.completions.create(model=MODEL, prompt="hi", top_p=7)
