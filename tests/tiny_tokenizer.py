"""An offline byte-level BPE tokenizer with an EOS token and a chat template, for engine and server tests."""

from __future__ import annotations

import functools

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
