"""An offline toy tokenizer (byte-level BPE trained on the shipped word list) for tests and smoke runs.

It tokenizes any text (byte-level fallback), has BOS/EOS/PAD tokens and a minimal chat template, and builds
in well under a second with no download.
"""

from __future__ import annotations

from .words import WORDS

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_toy_tokenizer(vocab_size: int = 1024, chat_template: bool = True):
    """A ``transformers`` fast tokenizer trained on the word list, digits and a little English."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = list(WORDS)
    corpus = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, len(words), 12)] * 3
    corpus += [" ".join(str(n) for n in range(k, k + 50)) for k in range(0, 1000, 50)]
    corpus += ["What is the special magic number for the key mentioned in the provided text? Answer: VAR"] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf
