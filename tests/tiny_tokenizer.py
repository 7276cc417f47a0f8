"""For engine and server tests: an offline byte-level BPE tokenizer with an EOS token and a chat template, a tiny
random Llama over its vocabulary, and a free loopback port."""

from __future__ import annotations

import functools
import socket

CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow.",
    "Hello world! How are you today? I am fine, thank you.",
    "Sparse caches keep the tokens that matter and drop the rest.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9. \u4f60\u597d\uff0c\u4e16\u754c\u3002 \U0001F600\U0001F680",
    "def add(a, b):\n    return a + b\n",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast``: byte-level BPE (~300 ids), ``<|end|>`` as EOS and pad, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_chat_model(seed: int = 0):
    """``(model, tokenizer)``: a random 2-layer Llama (hidden 64, GQA 4/2) over ``tiny_tokenizer()``'s ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512, head_dim=16,
                         eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config).eval(), tok


def save_tiny_chat_model(path, seed: int = 0) -> str:
    """Save ``tiny_chat_model(seed)`` and its tokenizer as a model directory; returns ``str(path)``."""
    model, tok = tiny_chat_model(seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (closed again, so a server can bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(http, url: str, proc, seconds: float = 120) -> None:
    """Poll ``url + "/health"`` with the ``httpx.Client`` ``http`` until it answers 200; fail at once if the server
    process ``proc`` exited, or after ``seconds``."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"the server did not come up in {seconds:.0f} s"
        try:
            if http.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.25)
