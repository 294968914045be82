"""Which tokenizer made a batch file's token ids: the SHA-256 of its vocabulary.

A batch file holds token ids, not text. Read back with a checkpoint (``source.model_path``)
or decoded with ``source.tokenizer``, its ids are taken to be that tokenizer's, and a tokenizer
of the same size with other tokens (Llama 2's and Mistral's both have 32,000) passes every range
check: the checkpoint would embed other tokens than were sampled and diagnose a batch that
never existed. So a dump records the vocabulary that tokenised it,

    tokenizer_sha256 = SHA-256( UTF-8 JSON of [[token, id], …], ordered by id, then token )

over the tokenizer's ``get_vocab()`` (the model's tokens and the added ones: one special token
more shifts every id after it), stored as the 32 bytes of the digest ([32] uint8; a ``.jsonl``
file gives them as 32 numbers on its first line). A read-back whose tokenizer has another digest
is refused. The digest depends only on which string has which id, not on the tokenizer's class
or the transformers version that saved it; a tokenizer that cannot list its vocabulary has no
digest, and then nothing is compared.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from gradlens.errors import GradlensError

KEY = "tokenizer_sha256"  # the batch-file key


def vocabulary_sha256(tokenizer: Any) -> Tensor | None:
    """The digest of ``tokenizer``'s vocabulary as [32] uint8 (module docstring); None when it
    has no ``get_vocab`` to list it."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    pairs = sorted(((int(i), str(token)) for token, i in vocab.items()))
    text = json.dumps([[token, i] for i, token in pairs], ensure_ascii=False)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return torch.tensor(list(digest), dtype=torch.uint8)


def hex_digest(digest: Tensor) -> str:
    return bytes(digest.to(torch.uint8).tolist()).hex()


def check_same_tokenizer(stored: Tensor, tokenizer: Any, key: str, label: str, file: str) -> None:
    """Refuse ``tokenizer`` (``label``, given by the setting ``key``) for the token ids of
    ``file`` when its vocabulary's digest is not the ``stored`` one."""
    ours = vocabulary_sha256(tokenizer)
    if ours is None or torch.equal(ours, stored.to(torch.uint8)):
        return
    raise GradlensError(
        f"{key}: the tokenizer of {label} did not make the token ids of {file}: the file's "
        f"{KEY!r} is {hex_digest(stored)[:16]}…, the digest of this tokenizer's vocabulary "
        f"{hex_digest(ours)[:16]}…, so its ids would be read as other tokens. Give the "
        f"checkpoint (or tokenizer) the batch was made with, or delete {KEY!r} from the file "
        "if the two tokenizers are known to give every token the same id"
    )
