"""The rollout: its precision chosen by what the device computes natively, and stop tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradlens.sources import rollout as rollout_module
from gradlens.sources.rollout import rollout_dtype, sample

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ({"avx512_bf16": True}, "bfloat16"),
        ({"amx_bf16": True}, "bfloat16"),
        ({"bf16": True}, "bfloat16"),  # Arm
        ({"avx512_bf16": False, "avx2": True}, "float32"),
        ({}, "float32"),
    ],
)
def test_auto_chooses_bf16_only_where_the_cpu_has_it(monkeypatch, caps, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    name, why = rollout_dtype("auto", CPU)
    assert name == expected and why.startswith("auto")


def test_an_explicit_rollout_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)
    assert rollout_dtype("bfloat16", CPU) == ("bfloat16", "source.rollout_dtype")


def test_without_capabilities_auto_is_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert rollout_module.native_bf16(CPU) is False


class Scripted(nn.Module):
    """A 'model' whose next token is fixed per step: token ``script[k]`` with probability ~1."""

    def __init__(self, script: list[int], vocab: int = 8) -> None:
        super().__init__()
        self.script, self.vocab, self.step = script, vocab, 0

    def forward(self, input_ids, **kwargs):
        n = input_ids.shape[0]
        logits = torch.full((n, input_ids.shape[1], self.vocab), -50.0)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 50.0
        self.step += 1
        return SimpleNamespace(logits=logits, past_key_values=None, cache=None)


def test_a_completion_stops_at_any_stop_token():
    tokenizer = SimpleNamespace(eos_token_id=0, pad_token_id=0, decode=lambda ids, **k: str(ids))
    # the end-of-turn token 5 comes second: a stop token beside the EOS ends the completion
    out = sample(
        Scripted([3, 5, 4, 4]), tokenizer, [[1, 2]], 1, 4, 1.0, 1.0,
        torch.Generator().manual_seed(0), CPU, stop=[0, 5],
    )  # fmt: skip
    seqs = out.sequences
    assert seqs.input_ids[0, 2:].tolist() == [3, 5]
    assert seqs.loss_mask.sum() == 2 and out.stopped == 1
    # without the end-of-turn token among the stop tokens it runs on
    out = sample(
        Scripted([3, 5, 4, 4]), tokenizer, [[1, 2]], 1, 4, 1.0, 1.0,
        torch.Generator().manual_seed(0), CPU,
    )  # fmt: skip
    assert out.sequences.input_ids[0, 2:].tolist() == [3, 5, 4, 4] and out.stopped == 0
