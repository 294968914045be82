"""Batch files with token ids only: the hidden states recomputed by ``source.model_path``.

A tiny random Llama is saved to a temporary directory; the reference hidden states come from
the transformers forward with ``output_hidden_states=True`` (the way a trainer would dump
them), and a file that stores them must give the same diagnosis as a file that stores only
the token ids in each of verl's layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.config import Config, validate
from gradlens.results import CompareReport

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

runner = CliRunner()
VOCAB, CONTEXT = 64, 32
N, P, T = 4, 6, 6
PROMPT_LENGTHS = [5, 3, 4, 2]  # left-padded to P = 6: one column of padding every row shares
RESPONSE_LENGTHS = [6, 4, 1, 5]  # right-padded to T = 6
TEMPERATURE = 1.5
LOSSES = ["reinforce", "ppo_clip", "sft"]


def save_llama(path: Path, tied: bool, pad_id: int = 0) -> Path:
    """A random Llama behind a word-level tokenizer; ``pad_id``: the config's pad token (the
    embedding's ``padding_idx``, whose rows get no gradient)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0, pad_token_id=pad_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w0", pad_token="w0").save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"), tied=False)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_tied"), tied=True)


@pytest.fixture(scope="module")
def rollout(checkpoint) -> dict[str, torch.Tensor]:
    """verl's tensors for N sequences, and the reference hidden states of each response token."""
    gen = torch.Generator().manual_seed(3)
    prompts = torch.zeros(N, P, dtype=torch.long)  # pad id 0
    responses = torch.zeros(N, T, dtype=torch.long)
    attention = torch.zeros(N, P + T, dtype=torch.long)
    for i, (p, t) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)):
        prompts[i, P - p :] = torch.randint(1, VOCAB, (p,), generator=gen)
        responses[i, :t] = torch.randint(1, VOCAB, (t,), generator=gen)
        attention[i, P - p : P + t] = 1
    response_mask = attention[:, P:]
    input_ids = torch.cat([prompts, responses], dim=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),  # verl's position ids
            output_hidden_states=True,
        )
    hidden = out.hidden_states[-1][:, P - 1 : -1]  # [N, T, H]: the states predicting responses
    logits = out.logits[:, P - 1 : -1]
    assert torch.allclose(model.lm_head(hidden), logits, rtol=0, atol=1e-12)
    logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, responses[..., None])[..., 0]
    noise = 0.3 * torch.randn(N, T, generator=gen, dtype=torch.float64)
    # float32-representable, so that a .jsonl file (read as float32) holds the same numbers
    old = (logp + noise).float().double() * response_mask
    return {
        "prompts": prompts,
        "responses": responses,
        "input_ids": input_ids,
        "attention_mask": attention,
        "prompt_mask": attention[:, :P],
        "response_mask": response_mask,
        "old_log_probs": old,
        "advantages": torch.tensor([1.0, -0.5, 0.25, -1.0], dtype=torch.float64),
        "hidden_states": hidden / TEMPERATURE,
        "lm_head_weight": model.lm_head.weight.detach().clone(),
    }


def config(path: Path, **source) -> Config:
    return validate({"dtype": "float64", "losses": LOSSES, "source": {"path": str(path), **source}})


def compare(path: Path, **source) -> CompareReport:
    return run_compare(config(path, **source))


def pick(data: dict, *keys: str) -> dict:
    return {k: data[k].contiguous() for k in keys}


def write_jsonl(path: Path, data: dict, whole: bool) -> None:
    """One unpadded line per sequence: the prompt, or (whole) prompt + response as input_ids."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(N):
            p, t = PROMPT_LENGTHS[i], RESPONSE_LENGTHS[i]
            prompt = data["prompts"][i, P - p :].tolist()
            response = data["responses"][i, :t].tolist()
            row: dict = {"responses": response}
            if whole:  # the loss mask: the response part of attention_mask
                row.update(input_ids=prompt + response, attention_mask=[1] * (p + t))
            else:
                row.update(prompts=prompt, response_mask=[1] * t)
            row.update(
                old_log_probs=data["old_log_probs"][i, :t].tolist(),
                advantages=float(data["advantages"][i]),
            )
            fh.write(json.dumps(row) + "\n")


LOG_PROBS = ("old_log_probs", "advantages")
LAYOUTS = {
    # verl's DataProto: prompts, responses, the mask over both, the loss mask
    "verl": ("prompts", "responses", "attention_mask", "response_mask", *LOG_PROBS),
    "prompt_mask": ("prompts", "prompt_mask", "responses", "response_mask", *LOG_PROBS),
    # the whole sequence; the loss mask is the last T columns of attention_mask
    "input_ids": ("input_ids", "attention_mask", "responses", *LOG_PROBS),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [*LAYOUTS, "jsonl", "jsonl_input_ids"])
def test_recomputed_hidden_states_give_the_stored_ones_diagnosis(
    tmp_path, checkpoint, rollout, layout
):
    from helpers import build_batch
    from safetensors.torch import save_file

    mask = rollout["response_mask"].bool()
    stored = tmp_path / "stored.safetensors"
    save_file(
        pick(rollout, *LAYOUTS["prompt_mask"], "hidden_states", "lm_head_weight"), str(stored)
    )
    ids_only = tmp_path / ("ids.jsonl" if layout.startswith("jsonl") else "ids.pt")
    if layout.startswith("jsonl"):
        write_jsonl(ids_only, rollout, whole=layout == "jsonl_input_ids")
    else:
        tensors = pick(rollout, *LAYOUTS[layout])
        if layout == "prompt_mask":  # padding ids outside the vocabulary are never read
            tensors["prompts"] = tensors["prompts"].masked_fill(
                ~tensors["prompt_mask"].bool(), -100
            )
            tensors["responses"] = tensors["responses"].masked_fill(~mask, -100)
        if layout == "verl":  # stored states that disagree as well: model_path wins over them
            tensors.update(
                hidden_states=torch.zeros(N, T, 32), lm_head_weight=torch.zeros(VOCAB, 32)
            )
        torch.save(tensors, ids_only)
    source = {"model_path": str(checkpoint), "temperature": TEMPERATURE}
    batch = build_batch(config(ids_only, **source), torch.device("cpu"), torch.float64)
    assert torch.equal(batch.mask, mask)
    # the same float64 forward, over one column less of left padding: equal to rounding
    torch.testing.assert_close(
        batch.hidden[mask], rollout["hidden_states"][mask], rtol=1e-10, atol=1e-12
    )
    assert torch.equal(batch.weight, rollout["lm_head_weight"])

    a, b = compare(stored), compare(ids_only, **source)
    assert a.passed and b.passed
    assert "hidden states recomputed by" in b.batch.source and "T = 1.5" in b.batch.source
    assert ("are not used" in b.batch.source) == (layout == "verl")
    assert b.batch.num_tokens == a.batch.num_tokens == sum(RESPONSE_LENGTHS)
    assert b.ratio.min == pytest.approx(a.ratio.min, rel=1e-9)
    assert b.ratio.max == pytest.approx(a.ratio.max, rel=1e-9)
    for x, y in zip(a.losses, b.losses, strict=True):
        assert x.name == y.name
        assert y.loss == pytest.approx(x.loss, rel=1e-9)
        assert y.rows.total_norm == pytest.approx(x.rows.total_norm, rel=1e-9)
        assert y.clipping == x.clipping
    assert b.losses[1].clipping.region > 0  # the noise on π_old reaches the clip range


def test_dump_stores_the_recomputed_hidden_states(tmp_path, checkpoint, rollout):
    # gradlens dump turns a token-ids file into one that carries its hidden states
    ids_only, stored = tmp_path / "ids.pt", tmp_path / "stored.safetensors"
    torch.save(pick(rollout, *LAYOUTS["verl"]), ids_only)
    sets = ["--set", "dtype=float64", "--set", f"source.path={ids_only}"]
    model = ["--set", f"source.model_path={checkpoint}"]
    result = runner.invoke(app, ["dump", "-o", str(stored), *sets, *model])
    assert result.exit_code == 0, result.output
    a, b = compare(ids_only, model_path=str(checkpoint)), compare(stored)
    assert "recomputed" not in b.batch.source
    for x, y in zip(a.losses, b.losses, strict=True):
        assert y.rows.total_norm == pytest.approx(x.rows.total_norm, rel=1e-12)


@pytest.mark.slow
def test_the_built_in_model_recomputes_on_policy_log_probs(tmp_path):
    # two short sequences tokenised for the built-in model; old_log_probs from its own forward
    from gradlens.sources.checkpoint import load_checkpoint

    loaded = load_checkpoint(None, torch.device("cpu"), torch.float32)
    tok = loaded.tokenizer
    pairs = [("def add(a, b):\n", "    return a + b\n"), ("import os\n", "import sys\n")]
    prompt_ids = [tok(p)["input_ids"] for p, _ in pairs]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"] for _, r in pairs]
    p, t = max(map(len, prompt_ids)), max(map(len, response_ids))
    prompts, responses = torch.zeros(2, p, dtype=torch.long), torch.zeros(2, t, dtype=torch.long)
    attention = torch.zeros(2, p + t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        prompts[i, p - len(a) :], responses[i, : len(b)] = torch.tensor(a), torch.tensor(b)
        attention[i, p - len(a) : p + len(b)] = 1
    with torch.no_grad():
        logits = loaded.model(
            input_ids=torch.cat([prompts, responses], 1),
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, p - 1 : -1]
    old = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    torch.save(
        {
            "prompts": prompts,
            "responses": responses,
            "attention_mask": attention,
            "response_mask": attention[:, p:],
            "old_log_probs": old * attention[:, p:],
            "advantages": torch.tensor([1.0, -1.0]),
        },
        tmp_path / "builtin.pt",
    )
    result = runner.invoke(
        app,
        ["compare", "-f", "json", "-l", "reinforce,ppo_clip",
         "--set", f"source.path={tmp_path / 'builtin.pt'}", "--set", "source.model_path=builtin"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "recomputed by the built-in model" in report["batch"]["source"]
    assert report["batch"]["num_tokens"] == sum(map(len, response_ids))
    # on-policy: r = 1 up to float32 (the batch forward and this one differ in padding)
    assert report["ratio"]["min"] == pytest.approx(1.0, abs=1e-4)
    assert report["ratio"]["max"] == pytest.approx(1.0, abs=1e-4)
    assert report["passed"]


# ----------------------------------------------------------------------------- whole model


def verl_file(tmp_path: Path, rollout: dict) -> Path:
    path = tmp_path / "step.pt"
    torch.save(pick(rollout, *LAYOUTS["verl"]), path)
    return path


def hand_written_sft(checkpoint: Path, rollout: dict) -> tuple[float, dict[str, float]]:
    """SFT with token-mean aggregation through the transformers model, by plain autograd.

    The loss −mean log softmax(z/T)(y) over the response tokens in the loss, with z the model's
    own logits on verl's [N, P+T] sequences (left padding kept): (loss, ‖.grad‖ per tensor, the
    total over every parameter — a tied tensor once, with the sum of both paths).
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    attention = rollout["attention_mask"]
    logits = model(
        input_ids=rollout["input_ids"],
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
    ).logits[:, P - 1 : -1]  # [N, T, V]: column P + t − 1 predicts response token t
    logp = torch.log_softmax(logits / TEMPERATURE, -1)
    sampled = logp.gather(-1, rollout["responses"][..., None])[..., 0]  # [N, T]
    loss = -sampled[rollout["response_mask"].bool()].mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = {
        "total": float(torch.nn.utils.get_total_norm(grads)),
        "embedding": float(model.get_input_embeddings().weight.grad.norm()),
        "lm_head": float(model.get_output_embeddings().weight.grad.norm()),
    }
    return loss.item(), norms


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_whole_model_gradients_of_a_batch_file_match_plain_autograd(
    tmp_path, checkpoint, tied_checkpoint, rollout, tied
):
    ckpt = tied_checkpoint if tied else checkpoint
    path = verl_file(tmp_path, rollout)
    report = compare(path, model_path=str(ckpt), temperature=TEMPERATURE)
    assert report.passed
    assert report.model is not None and report.model.source == "batch"
    assert report.model.batch_file == str(path)
    assert report.model.model.tied_embeddings == tied and report.model.model.path == str(ckpt)
    assert report.model.rollout is report.model.mismatch is report.model.staleness is None

    loss, expected = hand_written_sft(ckpt, rollout)
    sft = next(r for r in report.losses if r.name == "sft")
    mg = sft.model_grads
    assert mg is not None and mg.tied == tied
    # float64 on both sides; gradlens drops the column of left padding every row shares, so
    # the two forwards differ only by rounding (~1e-15 relative)
    assert sft.loss == pytest.approx(loss, rel=1e-9)
    assert mg.total_norm == pytest.approx(expected["total"], rel=1e-9)
    groups = {g.name: g.norm for g in mg.groups}
    assert set(groups) == {"embedding", "block 0", "block 1", "model.norm", "lm_head"}
    if tied:
        # the trainer's .grad of the shared tensor carries both paths; the lm_head row is the
        # logit path alone, so it differs from that .grad
        assert mg.tied_grad_norm == pytest.approx(expected["embedding"], rel=1e-9)
        assert abs(groups["lm_head"] - expected["lm_head"]) > 1e-3 * expected["lm_head"]
    else:
        assert mg.tied_grad_norm is None
        assert groups["lm_head"] == pytest.approx(expected["lm_head"], rel=1e-9)
        assert groups["embedding"] == pytest.approx(expected["embedding"], rel=1e-9)
    assert all(r.model_grads is not None for r in report.losses)


def test_lm_head_norm_of_the_whole_model_equals_the_lm_head_diagnostic(
    tmp_path, checkpoint, rollout
):
    # float32, as the model source's test: the whole-model backward and the lm_head diagnostic's
    # closed form compute the same tensor, summing the M·V products in different orders (~1e-7
    # relative apart in float32); 1e-5 leaves room without hiding a wrong row or a missing 1/T.
    path = verl_file(tmp_path, rollout)
    cfg = config(path, model_path=str(checkpoint), temperature=TEMPERATURE)
    report = run_compare(cfg.model_copy(update={"dtype": "float32"}))
    assert report.passed and report.environment.dtype == "float32"
    for r in report.losses:
        mg = r.model_grads
        assert mg is not None and not mg.tied
        groups = {g.name: g.norm for g in mg.groups}
        assert r.rows.total_norm is not None and r.rows.total_norm > 0
        assert groups["lm_head"] == pytest.approx(r.rows.total_norm, rel=1e-5)
        assert mg.lm_head_logit_path == groups["lm_head"]
        # untied: the total is the root of the sum of the squared group norms
        total = sum(n**2 for n in groups.values() if n is not None) ** 0.5
        assert mg.total_norm == pytest.approx(total, rel=1e-6)


@pytest.mark.slow
def test_whole_model_false_skips_them_and_lets_the_engine_stream(tmp_path, checkpoint, rollout):
    path = verl_file(tmp_path, rollout)
    off = config(path, model_path=str(checkpoint), whole_model=False)
    on = compare(path, model_path=str(checkpoint))
    report = run_compare(off)
    assert report.passed and report.model is None
    assert all(r.model_grads is None for r in report.losses)
    assert "whole model" not in report.batch.source and "whole model" in on.batch.source
    # the lm_head diagnosis does not depend on the switch
    for x, y in zip(on.losses, report.losses, strict=True):
        assert y.rows.total_norm == x.rows.total_norm
    streamed = off.model_copy(
        update={"diagnostics": off.diagnostics.model_copy(update={"engine": "streamed"})}
    )
    assert run_compare(streamed).engine.path == "streamed"  # type: ignore[union-attr]


def grouped_file(tmp_path: Path, rollout: dict, group: int = 3) -> Path:
    """verl's layout with each prompt repeated ``group`` times (``n`` samples per prompt,
    consecutive as verl's repeat(interleave=True) leaves them), each with its own response."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.arange(N).repeat_interleave(group)
    data = {k: rollout[k][rows].clone() for k in (*LAYOUTS["verl"], "prompt_mask")}
    lengths = torch.randint(1, T + 1, (len(rows),), generator=gen)
    for i, t in enumerate(lengths.tolist()):
        data["responses"][i] = 0
        data["responses"][i, :t] = torch.randint(1, VOCAB, (t,), generator=gen)
        data["response_mask"][i] = 0
        data["response_mask"][i, :t] = 1
    data["attention_mask"] = torch.cat([data["prompt_mask"], data["response_mask"]], dim=1)
    data["advantages"] = torch.randn(len(rows), dtype=torch.float64, generator=gen)
    path = tmp_path / "grouped.pt"
    torch.save(pick(data, *LAYOUTS["verl"]), path)
    return path


@pytest.mark.slow
def test_a_grouped_batch_file_goes_through_with_one_copy_of_each_prompt(
    tmp_path, checkpoint, rollout
):
    path = grouped_file(tmp_path, rollout)
    cfg = {"model_path": str(checkpoint), "temperature": TEMPERATURE}
    packed = compare(path, **cfg)
    padded = compare(path, **cfg, shared_prefix=False)
    assert packed.passed and padded.passed
    done, grid = packed.model.gradient_pass, padded.model.gradient_pass
    assert done.shared_prefix and not grid.shared_prefix
    assert done.padded_positions == grid.positions and done.positions < grid.positions
    assert "the responses to one prompt after one copy of it" in packed.batch.source
    assert "one copy" not in padded.batch.source
    # float64, but transformers' LlamaRMSNorm computes in float32: the packed products have
    # other shapes, so the two agree to float32's rounding (as the model source's passes)
    for a, b in zip(packed.losses, padded.losses, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6, abs=1e-9)
        assert a.rows.total_norm == pytest.approx(b.rows.total_norm, rel=1e-6)
        assert a.model_grads.total_norm == pytest.approx(b.model_grads.total_norm, rel=1e-6)
        for x, y in zip(a.model_grads.groups, b.model_grads.groups, strict=True):
            assert x.name == y.name and x.norm == pytest.approx(y.norm, rel=1e-6, abs=1e-12)


def test_a_packed_batch_without_padding_or_id_0_on_a_tied_checkpoint(tmp_path):
    # Real tokenizers pad with an end-of-turn id (SmolLM2-Instruct: 2, Qwen: 151643), so id 0
    # need not occur in a batch, nor be the embedding's padding_idx. Here the grid has no
    # padding and no 0; packed, a prompt with 3 responses and one with 2 make rows of two
    # widths, and the shorter row is padded. That padding must look up a row the batch names:
    # the tied embedding's gradient (its rows) may only have the batch's ids, and the norms are
    # the padded grid's, by plain autograd.
    tied_checkpoint = save_llama(tmp_path / "llama", tied=True, pad_id=VOCAB - 1)
    gen = torch.Generator().manual_seed(11)
    groups = [3, 2]
    prompts = torch.cat(
        [torch.randint(1, VOCAB - 1, (1, P), generator=gen).repeat(g, 1) for g in groups]
    )
    n = len(prompts)
    responses = torch.randint(1, VOCAB - 1, (n, T), generator=gen)
    ones = torch.ones(n, P + T, dtype=torch.long)
    batch = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": ones,
        "response_mask": ones[:, P:],
        "old_log_probs": -torch.rand(n, T, dtype=torch.float64, generator=gen),
        "advantages": torch.randn(n, dtype=torch.float64, generator=gen),
    }
    assert not bool((batch["input_ids"] == 0).any())
    path = verl_file(tmp_path, batch)
    report = compare(path, model_path=str(tied_checkpoint), temperature=TEMPERATURE)
    assert report.passed
    assert report.model is not None and report.model.gradient_pass is not None
    assert report.model.gradient_pass.shared_prefix
    loss, expected = hand_written_sft(tied_checkpoint, batch)
    sft = next(r for r in report.losses if r.name == "sft")
    assert sft.loss == pytest.approx(loss, rel=1e-6)
    mg = sft.model_grads
    assert mg is not None and mg.tied
    # float64, but LlamaRMSNorm computes in float32 and the packed products have other shapes
    assert mg.tied_grad_norm == pytest.approx(expected["embedding"], rel=1e-6)
    assert mg.total_norm == pytest.approx(expected["total"], rel=1e-6)


@pytest.mark.slow
def test_the_cli_table_and_json_of_a_batch_file_with_a_checkpoint(tmp_path, checkpoint, rollout):
    from gradlens.report.serialize import json_schema

    path = verl_file(tmp_path, rollout)
    sets = ["--set", f"source.path={path}", "--set", f"source.model_path={checkpoint}"]
    result = runner.invoke(app, ["compare", "--check", *sets])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("checkpoint (batch file)", "LlamaForCausalLM", "whole-model gradient norms",
                 "total ‖∇L‖ (trainer grad_norm)", "seed post's estimate"):  # fmt: skip
        assert text in out, text
    for text in ("─ model source", "training–inference mismatch", "staleness: r = π_θk/π_old"):
        assert text not in out, text

    result = runner.invoke(app, ["compare", "-f", "json", "--check", *sets])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = data["model"]
    assert model["source"] == "batch" and model["batch_file"] == str(path)
    assert model["rollout"] is model["mismatch"] is model["staleness"] is None
    assert model["model"]["rollout_dtype"] is None and model["model"]["tied_embeddings"] is False
    assert all(loss["model_grads"]["total_norm"] > 0 for loss in data["losses"])
    assert CompareReport.model_validate(data).model is not None  # the output obeys its schema
    schema = json.loads(json_schema())["$defs"]["ModelReport"]
    for key in ("rollout", "mismatch", "staleness"):
        assert key not in schema.get("required", [])
        assert {"type": "null"} in schema["properties"][key]["anyOf"]


@pytest.mark.slow
def test_the_streamed_engine_runs_with_whole_model_gradients(tmp_path, checkpoint, rollout):
    """The lm_head diagnostics stream; the whole-model gradients need only the scalar loss."""
    torch.save(pick(rollout, *LAYOUTS["verl"]), tmp_path / "b.pt")
    reports = {}
    for engine in ("materialized", "streamed"):
        cfg = validate(
            {
                "losses": ["reinforce", "ppo_clip"],
                "source": {"path": str(tmp_path / "b.pt"), "model_path": str(checkpoint)},
                "diagnostics": {"engine": engine},
            }
        )
        reports[engine] = run_compare(cfg)
    mat, stream = reports["materialized"], reports["streamed"]
    assert stream.engine is not None and stream.engine.path == "streamed"
    for a, b in zip(mat.losses, stream.losses, strict=True):
        assert a.model_grads is not None and b.model_grads is not None
        assert b.model_grads.total_norm == pytest.approx(a.model_grads.total_norm, rel=1e-5)
        assert b.rows.total_norm == pytest.approx(a.rows.total_norm, rel=1e-4)


# ----------------------------------------------------------------------------- bad input


def error(tmp_path: Path, tensors: dict, *sets: str) -> str:
    torch.save(tensors, tmp_path / "bad.pt")
    result = runner.invoke(
        app,
        ["compare", "--set", f"source.path={tmp_path / 'bad.pt'}", *(f"--set={s}" for s in sets)],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def test_missing_prompts_and_masks_name_the_keys(tmp_path, checkpoint, rollout):
    model = f"source.model_path={checkpoint}"
    err = error(tmp_path, pick(rollout, "responses", "response_mask", *LOG_PROBS), model)
    assert "no prompt tokens" in err and "'prompts'" in err and "'input_ids'" in err
    err = error(tmp_path, pick(rollout, "prompts", "responses", "response_mask", *LOG_PROBS), model)
    assert "'prompt_mask'" in err and "'attention_mask'" in err
    # without model_path the file must store the hidden states
    err = error(tmp_path, pick(rollout, *LAYOUTS["verl"]))
    assert "no 'hidden_states'" in err and "source.model_path" in err


def test_token_ids_outside_the_models_vocabulary(tmp_path, checkpoint, rollout):
    tensors = pick(rollout, *LAYOUTS["verl"])
    tensors["prompts"] = tensors["prompts"].clone()
    tensors["prompts"][0, -1] = VOCAB + 3
    err = error(tmp_path, tensors, f"source.model_path={checkpoint}")
    assert f"token id {VOCAB + 3}" in err and f"[0, {VOCAB})" in err and "source.model_path" in err


def test_a_sequence_longer_than_the_context(tmp_path, checkpoint, rollout):
    p = CONTEXT
    tensors = pick(rollout, "responses", "response_mask", *LOG_PROBS)
    tensors["prompts"] = torch.ones(N, p, dtype=torch.long)
    tensors["prompt_mask"] = torch.ones(N, p, dtype=torch.long)
    err = error(tmp_path, tensors, f"source.model_path={checkpoint}")
    assert (
        f"{p + T} prompt + response tokens" in err
        and f"({CONTEXT}, max_position_embeddings)" in err
    )


def test_right_padded_prompts_are_refused(tmp_path, checkpoint, rollout):
    tensors = pick(rollout, "prompts", "responses", "response_mask", *LOG_PROBS)
    tensors["prompt_mask"] = tensors["prompts"] != 0
    tensors["prompt_mask"] = torch.flip(tensors["prompt_mask"], dims=[1])  # padding on the right
    err = error(tmp_path, tensors, f"source.model_path={checkpoint}")
    assert "must be left-padded" in err and "sequence 0" in err


def test_input_ids_that_do_not_end_with_the_responses(tmp_path, checkpoint, rollout):
    tensors = pick(rollout, *LAYOUTS["input_ids"])
    tensors["input_ids"] = torch.roll(tensors["input_ids"], 1, dims=1)
    err = error(tmp_path, tensors, f"source.model_path={checkpoint}")
    assert "columns of 'input_ids' are not 'responses'" in err


@pytest.mark.parametrize("value", [2.0, 0.5, float("nan")])
def test_an_attention_mask_over_the_response_must_be_0_or_1(tmp_path, checkpoint, rollout, value):
    # before: read as `!= 0`, so 2, 0.5 and NaN marked real tokens (exit 0)
    tensors = pick(rollout, *LAYOUTS["input_ids"])
    attention = tensors["attention_mask"].double().clone()
    attention[0, -1] = value
    tensors["attention_mask"] = attention
    err = error(tmp_path, tensors, f"source.model_path={checkpoint}")
    last = attention.shape[1] - 1
    assert f"'attention_mask'[0, {last}]" in err and "0 (padding) or 1 (a real token)" in err


def test_input_ids_whose_response_part_is_not_whole_are_refused(tmp_path, checkpoint, rollout):
    # before: cut to an integer, so 1.5 compared equal to a response id 1
    tensors = pick(rollout, *LAYOUTS["input_ids"])
    ids = tensors["input_ids"].double().clone()
    ids[0, -1] += 0.5
    tensors["input_ids"] = ids
    err = error(tmp_path, tensors, f"source.model_path={checkpoint}")
    assert "'input_ids'[0," in err and "not a whole number" in err


def test_model_path_must_be_a_checkpoint_directory(tmp_path, rollout):
    tensors = pick(rollout, *LAYOUTS["verl"])
    err = error(tmp_path, tensors, f"source.model_path={tmp_path / 'nope'}")
    assert "source.model_path:" in err and "is not a local directory" in err
    (tmp_path / "file").write_text("x")
    assert "is a file" in error(tmp_path, tensors, f"source.model_path={tmp_path / 'file'}")


def test_temperature_needs_model_path(tmp_path, rollout):
    err = error(tmp_path, pick(rollout, *LAYOUTS["verl"]), "source.temperature=0.7")
    assert "temperature applies only with model_path" in err


def test_whole_model_needs_model_path(tmp_path, rollout):
    err = error(tmp_path, pick(rollout, *LAYOUTS["verl"]), "source.whole_model=true")
    assert "source" in err and "whole_model needs model_path" in err


# ----------------------------------------------------------------------------- dump round trip

# Prompts for the checkpoint's word-level tokenizer, of different lengths: left padding
MODEL_PROMPTS = ["w5 w9 w3 w17", "w2 w8", "w40 w41 w42"]


def model_source(checkpoint: Path, **source) -> dict:
    src = {
        "kind": "model", "path": str(checkpoint), "prompts": MODEL_PROMPTS, "group_size": 2,
        "max_new_tokens": 8, "temperature": TEMPERATURE, "reward": "length",
        "rollout_dtype": "float32", **source,
    }  # fmt: skip
    return {"losses": [*LOSSES, "grpo"], "source": src}


def dump_model_source(path: Path, cfg: dict) -> None:
    import yaml

    config_file = path.with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["dump", "-c", str(config_file), "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "prompts of ≤" in result.output


def read_back(path: Path, checkpoint: Path | None = None) -> CompareReport:
    """The dumped file, alone or with the checkpoint that recomputes its hidden states."""
    source: dict = {"path": str(path)}
    if checkpoint is not None:  # the model source's temperature, folded into stored states
        source.update(model_path=str(checkpoint), temperature=TEMPERATURE)
    return run_compare(validate({"losses": [*LOSSES, "grpo"], "source": source}))


@pytest.fixture(scope="module")
def model_run(checkpoint) -> CompareReport:
    # θ: no stale steps, so the checkpoint's parameters are the ones every path uses
    return run_compare(validate(model_source(checkpoint, stale={"steps": 0})))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".jsonl"])
def test_a_dumped_model_batch_is_re_diagnosed_with_its_checkpoint(
    tmp_path, checkpoint, model_run, suffix
):
    from gradlens.batchfile import read_batch_tensors

    cfg = model_source(checkpoint, stale={"steps": 0})
    path = tmp_path / f"model{suffix}"
    dump_model_source(path, cfg)
    data = read_batch_tensors(path, prompts=True)
    # verl's layout: the completion alone on the response grid, the prompt left-padded before it
    n, t = data["tokens"].shape
    assert n == len(MODEL_PROMPTS) * 2 and bool(data["mask"][:, 0].all())
    assert data["prompt_mask"][:, -1].all() and not data["prompt_mask"][:, 0].all()
    assert data["hidden"].shape[:2] == (n, t)

    stored, recomputed = read_back(path), read_back(path, checkpoint)
    original = model_run
    for report in (stored, recomputed):
        assert report.passed
        assert report.batch.num_tokens == original.batch.num_tokens
        assert report.ratio.min == pytest.approx(original.ratio.min, rel=1e-6)
        assert report.ratio.max == pytest.approx(original.ratio.max, rel=1e-6)
    assert "recomputed" in recomputed.batch.source and recomputed.model is not None
    # Float32 throughout. The stored file holds the model source's own float32 tensors, cut to
    # the completion columns; the recomputed hidden states come from the same float32 weights
    # over the same tokens and positions, in a forward of another shape (other padding ids,
    # the shared left padding dropped), so they agree to float32 rounding (~1e-7 relative).
    # Row norms, coefficients and whole-model norms reduce over the tokens in the loss: 1e-5
    # relative leaves room for that rounding and still catches a shifted column (wrong token
    # or state) or a missing 1/T, which change them by far more. The loss values are float32
    # sums over the [N, T] grid, whose width differs (the model source's grid spans prompt +
    # completion), so their last bits may differ: 1e-6 relative (8 float32 ulps), or 1e-6
    # absolute where on-policy ppo_clip / grpo cancel to ~1e-2 (~10 roundings of a term).
    for x, a, b in zip(original.losses, stored.losses, recomputed.losses, strict=True):
        assert x.name == a.name == b.name
        for y in (a, b):
            assert y.loss == pytest.approx(x.loss, rel=1e-6, abs=1e-6)
            assert y.rows.total_norm == pytest.approx(x.rows.total_norm, rel=1e-5)
            assert y.coefficient_abs_mean == pytest.approx(x.coefficient_abs_mean, rel=1e-5)
            assert y.coefficient_abs_max == pytest.approx(x.coefficient_abs_max, rel=1e-5)
            if x.name == "grpo":
                # c_t = 0 where A = 0 needs the KL term's π_θ/π_ref = 1 to the last bit too,
                # which the recomputed log-probs (another forward's rounding) decide token by
                # token: at most the tokens with A = 0 (reinforce's zero_grad)
                zeros = original.losses[0].clipping.zero_grad
                assert 0.0 <= y.clipping.zero_grad <= zeros
                assert y.clipping.model_copy(update={"zero_grad": 0.0}) == (
                    x.clipping.model_copy(update={"zero_grad": 0.0})
                )
            else:
                assert y.clipping == x.clipping
        assert x.rows.total_norm is not None and x.rows.total_norm > 0
        # the whole model at the same θ over the same tokens: the same total and groups
        assert x.model_grads is not None and b.model_grads is not None
        assert b.model_grads.total_norm == pytest.approx(x.model_grads.total_norm, rel=1e-5)
        for g, h in zip(x.model_grads.groups, b.model_grads.groups, strict=True):
            assert g.name == h.name and h.norm == pytest.approx(g.norm, rel=1e-5)
        assert a.model_grads is None  # hidden states alone: no model to run


@pytest.mark.slow
def test_a_dumped_stale_batch_holds_the_states_after_the_steps(tmp_path, checkpoint):
    # With stale steps the model source diagnoses θ_N (after the steps) against π_old at the
    # checkpoint's θ_0: the dump stores θ_N's hidden states and lm_head, so the file alone gives
    # that diagnosis; the checkpoint is θ_0, so recomputing from it gives π_θ = π_old instead.
    cfg = model_source(checkpoint, stale={"steps": 2, "lr": 1e-2})
    path = tmp_path / "stale.safetensors"
    dump_model_source(path, cfg)
    original = run_compare(validate(cfg))
    stored, recomputed = read_back(path), read_back(path, checkpoint)
    assert original.ratio.min < 0.99 and original.ratio.max > 1.01  # real staleness
    assert stored.ratio.min == pytest.approx(original.ratio.min, rel=1e-6)
    assert stored.ratio.max == pytest.approx(original.ratio.max, rel=1e-6)
    for x, a in zip(original.losses, stored.losses, strict=True):
        assert a.rows.total_norm == pytest.approx(x.rows.total_norm, rel=1e-5)
    # θ_0 against π_old taken at θ_0 by the same float32 forward: r = 1 to float32 rounding
    assert recomputed.ratio.min == pytest.approx(1.0, abs=1e-5)
    assert recomputed.ratio.max == pytest.approx(1.0, abs=1e-5)
