"""Token ids as text: each valid token of a batch, a window of context around it, and each
sequence's completion, decoded by the batch's tokenizer.

The tokenizer is the model source's, a batch file's checkpoint's (``source.model_path``) or
the one named by ``source.tokenizer``, or the Python API's ``tokenizer=`` (`batch_tokenizer`).
Anything with a ``decode(list[int]) -> str`` method works (a transformers tokenizer, a
``tokenizers.Tokenizer``). The context of a token is its sequence's real tokens: the prompt and
the completion when the batch carries its sequences (`ModelContext`), else the sequence's valid
tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradlens.containers import Batch

WINDOW = 8  # tokens decoded on each side of a token
SEQUENCE_CHARS = 160  # a sequence's text is cut to this many characters


def batch_tokenizer(batch: Batch) -> Any | None:
    """The tokenizer that produced the batch's ids, or None when none is known."""
    if batch.tokenizer is not None:
        return batch.tokenizer
    ctx = batch.model_context
    return None if ctx is None else ctx.loaded.tokenizer


class TokenTexts:
    """Decoded tokens of one batch (see the module docstring)."""

    def __init__(self, tokenizer: Any, ids: list[list[int]], index: Tensor, mask: Tensor):
        """``ids[n]``: sequence n's context ids; ``index`` [N, T]: where grid position (n, t)'s
        token is in ``ids[n]`` (−1: nowhere); ``mask`` [N, T] the valid tokens."""
        self.tokenizer = tokenizer
        self.ids = ids
        self.index = index.tolist()
        self.mask = mask.tolist()

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids)) if ids else ""

    def token(self, n: int, t: int) -> str | None:
        k = self.index[n][t]
        return None if k < 0 else self.decode([self.ids[n][k]])

    def context(self, n: int, t: int, window: int = WINDOW) -> str | None:
        """The ``window`` tokens before and after (n, t), the token itself in «»."""
        k = self.index[n][t]
        if k < 0:
            return None
        ids = self.ids[n]
        before = self.decode(ids[max(0, k - window) : k])
        after = self.decode(ids[k + 1 : k + 1 + window])
        return f"{before}«{self.decode([ids[k]])}»{after}"

    def sequence(self, n: int) -> str:
        """Sequence n's valid tokens, decoded, cut to `SEQUENCE_CHARS` characters."""
        ids = [self.ids[n][k] for k, on in zip(self.index[n], self.mask[n], strict=True) if on]
        text = self.decode(ids)
        return text if len(text) <= SEQUENCE_CHARS else text[: SEQUENCE_CHARS - 1] + "…"


def token_texts(batch: Batch, tokenizer: Any) -> TokenTexts:
    """`TokenTexts` of ``batch`` under ``tokenizer``."""
    ctx = batch.model_context
    mask = batch.mask.cpu()
    n, t = mask.shape
    if ctx is None:  # the valid tokens are all there is
        tokens = batch.tokens.cpu()
        ids = [tokens[i][mask[i]].tolist() for i in range(n)]
        index = torch.where(mask, torch.cumsum(mask.long(), 1) - 1, -1)
        return TokenTexts(tokenizer, ids, index, mask)
    # grid column t predicts sequence column offset + t + 1 (`ModelContext`)
    attention = ctx.sequences.attention_mask.cpu().bool()  # [N, L]
    input_ids = ctx.sequences.input_ids.cpu()
    ids = [input_ids[i][attention[i]].tolist() for i in range(n)]
    position = torch.cumsum(attention.long(), 1) - 1  # [N, L]: index among the real tokens
    columns = ctx.offset + 1 + torch.arange(t)  # [T]
    inside = columns < attention.shape[1]
    columns = columns.clamp(max=attention.shape[1] - 1)
    real = attention[:, columns] & inside[None, :]  # [N, T]
    index = torch.where(real, position[:, columns], -1)
    return TokenTexts(tokenizer, ids, index, mask)
