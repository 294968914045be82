"""The rollout: its precision chosen by what the device computes natively, stop tokens, no
library warnings on the built-in model, the cache name it uses, and each prompt prefilled once
(the rollout bit for bit a forward over every row's, with the suite's pinned kernels)."""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from cpu_kernels import pinned
from torch import nn

from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.sources import rollout as rollout_module
from gradlens.sources.rollout import cache_keyword, rollout_dtype, sample

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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_a_builtin_model_run_raises_no_library_warning():
    """A real-model run (rollout with a KV cache, training pass, staleness steps) is silent:
    every Python warning is an error here, and transformers' own log is captured — its
    'warn once' messages are forgotten first, so an earlier test cannot have used them up."""
    pytest.importorskip("transformers")
    config = {
        "losses": ["reinforce", "ppo_clip"],
        "source": {"kind": "model", "num_prompts": 2, "group_size": 2, "max_new_tokens": 4},
    }
    log = logging.getLogger("transformers")
    handler = _Records()
    log.addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None:
        once.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = run_compare(validate(config))
    finally:
        log.removeHandler(handler)
    assert report.model is not None and report.model.rollout is not None
    assert report.model.rollout.completion_tokens > 0
    assert handler.messages == []


class _Old(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class _New(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


def test_the_cache_goes_by_the_name_the_forward_takes():
    assert cache_keyword(_Old()) == "past_key_values"
    assert cache_keyword(_New()) == "cache"


class WithBuffers(nn.Module):
    """Tied weights, a float buffer, an integer buffer and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=True)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("scale", torch.randn(4))
        self.register_buffer("steps", torch.arange(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_rollout_copy_is_the_converted_deep_copy_bit_for_bit(dtype):
    torch.manual_seed(0)
    model = WithBuffers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = rollout_module.rollout_copy(model, dtype)
    expected = copy.deepcopy(model).to(dtype)
    got, want = copied.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    assert copied.head.weight is copied.embed.weight  # the tie survives
    assert copied.steps.dtype == torch.int64
    assert not copied.frozen.requires_grad and copied.head.bias.requires_grad
    for key, value in model.state_dict().items():  # the original is untouched
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert copied.embed.weight.data_ptr() != model.embed.weight.data_ptr()


class Recorded(nn.Module):
    """A model that records the rows of every forward and delegates to ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

        @functools.wraps(inner.forward)  # the signature the rollout inspects is the inner's
        def forward(**kwargs):
            self.rows.append(int(kwargs["input_ids"].shape[0]))
            return inner(**kwargs)

        self.forward = forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_prompt_is_prefilled_once_and_the_rollout_is_the_rows_own(monkeypatch, dtype):
    """Four prompts × three completions: the prompts' forward takes the four prompts, and the
    rollout — tokens and μ — is the one of a forward over all twelve rows, bit for bit (a row's
    keys, values and logits depend on that row only; with the suite's pinned kernels the
    products of 4 and of 12 rows agree to the bit; with the native MKL of a Xeon with AMX, a
    float32 rollout's μ moved by up to 2e-6, the tokens and the bf16 rollout did not)."""
    pytest.importorskip("transformers")
    from gradlens.sources.checkpoint import load_checkpoint
    from gradlens.sources.prompts import choose_prompts, tokenize_prompts

    loaded = load_checkpoint(None, CPU, torch.float32)
    model = rollout_module.rollout_copy(loaded.model, dtype)
    prompts, key = choose_prompts(None, 4, 0, False)
    ids = tokenize_prompts(prompts, key, loaded, 6, False)
    assert len({len(p) for p in ids}) > 1  # left padding in the prompts' forward too

    def run() -> tuple[rollout_module.Rollout, list[int]]:
        recorded = Recorded(model)
        out = sample(
            recorded, loaded.tokenizer, ids, 3, 6, 1.0, 1.0, torch.Generator().manual_seed(0), CPU
        )
        return out, recorded.rows

    once, rows = run()
    assert rows[0] == 4 and all(r == 12 for r in rows[1:])
    every_row = rollout_module.prefill
    monkeypatch.setattr(
        rollout_module, "prefill", lambda m, k, i, a, p, g: every_row(m, k, i, a, p, 1)
    )
    plain, rows = run()
    assert rows[0] == 12
    assert torch.equal(once.sequences.input_ids, plain.sequences.input_ids)
    if pinned() or dtype == torch.bfloat16:
        assert torch.equal(once.rollout_logp, plain.rollout_logp)
    else:  # the CPU's own MKL: products of 4 and of 12 rows may round apart (docstring);
        # log-probs of |ℓ| ≤ ~10 in float32: 1e-5 is ~100 ulps, a wrong row is O(1)
        torch.testing.assert_close(once.rollout_logp, plain.rollout_logp, rtol=0, atol=1e-5)
    assert once.completions == plain.completions


class NoRepeat(nn.Module):
    """A model whose cache cannot repeat its rows: every row goes through the prompts' forward."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def forward(self, input_ids, past_key_values=None, **kwargs):
        self.rows.append(int(input_ids.shape[0]))
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 8)
        return SimpleNamespace(logits=logits, past_key_values=object())


def test_a_cache_that_cannot_repeat_rows_gets_every_row():
    model = NoRepeat()
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0, decode=lambda ids, **k: "")
    out = sample(
        model, tokenizer, [[1, 2], [3]], 2, 2, 1.0, 1.0, torch.Generator().manual_seed(0), CPU
    )
    assert model.rows == [2, 4, 4]  # the prompts once, then every row again; one decoding step
    assert out.sequences.input_ids.shape == (4, 4)
