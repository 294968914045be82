"""Tiny random checkpoints for the model-source tests, saved the way users save theirs.

Each builder trains a small byte-level BPE tokenizer on a few lines of text, builds a random
model from a config, and writes both with ``save_pretrained`` into a directory that
``gradlens compare --source model --set source.path=DIR`` loads like any user checkpoint.

``save_instruct_checkpoint`` is a chat/instruct-style one (docs/model.md's worked example): its
tokenizer adds a BOS token to every text (as Llama's does) and has a chat template that writes
the BOS itself, user and assistant headers, and an end-of-turn token that the generation config
lists as a stop token beside the EOS. Build it from the command line with

    python tests/tiny_checkpoints.py instruct DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

EOS = "<|endoftext|>"
VOCAB = 300
TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "import os\nimport sys\n\nfor i in range(10):\n    print(i, os.sep, sys.argv)\n"
) * 20

BOS, USER, ASSISTANT, END = "<|begin_of_text|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT_TEXT = (
    "Explain what a hash table is in at most 12 words.\n"
    "A hash table maps keys to values through a hash function.\n"
    "Describe the moon in at most 8 words.\nThe moon is a bright rocky satellite.\n"
) * 20


def train_bpe(text: str, special: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def make_tokenizer(extra_tokens: int = 0) -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(TEXT, [EOS])
    if extra_tokens:
        tok.add_special_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def save_checkpoint(
    path: Path,
    arch: str,
    tokenizer: Any = None,
    context: int = 64,
    tiled: tuple[int, float] | None = None,
    seed: int = 0,
) -> Path:
    """A random ``llama`` (untied), ``gpt2`` (tied embeddings) or ``phi`` (an lm_head bias, a
    block with parallel attention) model with the BPE tokenizer;
    ``tiled = (V, scale)``: a Llama with V rows whose lm_head is its first VOCAB rows (the
    tokenizer's) repeated and scaled; ``seed`` draws its random weights."""
    import transformers

    torch.manual_seed(seed)
    vocab = VOCAB if tiled is None else tiled[0]
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context,
            tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    elif arch == "phi":
        config = transformers.PhiConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=context, eos_token_id=0,
            bos_token_id=0,
        )  # fmt: skip
        model = transformers.PhiForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=context,
            eos_token_id=0, bos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    if tiled is not None:
        with torch.no_grad():
            head = model.get_output_embeddings().weight  # [V, H]
            head.copy_(tiled[1] * head[:VOCAB].repeat(-(-vocab // VOCAB), 1)[:vocab])
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return path


def make_instruct_tokenizer() -> Any:
    """BOS added to every text, a chat template, and an end-of-turn token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(CHAT_TEXT, [EOS, BOS, USER, ASSISTANT, END])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    out.chat_template = CHAT_TEMPLATE
    return out


def save_instruct_checkpoint(path: Path, context: int = 128) -> Path:
    """A random Llama with tied embeddings behind the instruct tokenizer; its generation config
    stops at EOS and at the end-of-turn token."""
    import transformers

    tokenizer = make_instruct_tokenizer()
    eos, end, bos = (tokenizer.convert_tokens_to_ids(t) for t in (EOS, END, BOS))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        tie_word_embeddings=True, eos_token_id=[eos, end], bos_token_id=bos, pad_token_id=eos,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [eos, end]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    builders = {"instruct": save_instruct_checkpoint, "llama": None, "gpt2": None}
    if len(sys.argv) != 3 or sys.argv[1] not in builders:
        sys.exit(f"usage: python {sys.argv[0]} instruct|llama|gpt2 DIR")
    kind, where = sys.argv[1], Path(sys.argv[2])
    if kind == "instruct":
        save_instruct_checkpoint(where)
    else:
        save_checkpoint(where, kind)
    print(f"wrote {where}")
