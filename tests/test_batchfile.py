"""Rollout batch files: written by gradlens or by a plain torch script, read back, diagnosed."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gradlens.batchfile import read_batch_tensors, write_batch
from gradlens.cli import app
from gradlens.errors import GradlensError
from gradlens.sources.checkpoint import load_tokenizer

runner = CliRunner()
SMALL = ["--set", "source.vocab_size=200", "--set", "source.num_sequences=8"]


def test_a_dump_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "batch.pt"
    path.write_bytes(b"the previous dump")

    def broken_save(obj, f):
        f.write(b"half")  # a writer that fails after writing part of the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    result = runner.invoke(app, ["dump", "-o", str(path), *SMALL])
    assert result.exit_code == 2  # a user error with its message, not a crash
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert path.read_bytes() == b"the previous dump"
    assert sorted(tmp_path.iterdir()) == [path]


def compare_json(*args: str) -> dict:
    result = runner.invoke(app, ["compare", "-f", "json", "-l", "reinforce,ppo_clip,sft", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".jsonl"])
def test_dump_and_read_back_gives_the_same_diagnosis(tmp_path, suffix):
    path = tmp_path / f"batch{suffix}"
    dumped = runner.invoke(app, ["dump", "-o", str(path), *SMALL])
    assert dumped.exit_code == 0, dumped.output
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left beside it
    direct = compare_json(*SMALL)
    read = compare_json("--set", f"source.path={path}")
    assert read["batch"]["source"].startswith(f"batch file batch{suffix}")
    assert read["batch"]["num_tokens"] == direct["batch"]["num_tokens"]
    for a, b in zip(read["losses"], direct["losses"], strict=True):
        # the same float32 tensors go in (jsonl stores them as decimal text of the float32
        # values, which parse back exactly), so the diagnosis is identical up to summation order
        assert a["rows"]["total_norm"] == pytest.approx(b["rows"]["total_norm"], rel=1e-6)
        assert a["clipping"] == b["clipping"]
    assert read["passed"]


@pytest.mark.parametrize("suffix", [".safetensors", ".jsonl"])
def test_a_float64_batch_reads_back_in_float64(tmp_path, suffix):
    """JSON numbers are doubles: a .jsonl file is read in the run's dtype like every format
    (it was read as float32 once, whatever ``dtype`` said)."""
    from helpers import build_batch

    from gradlens.config import validate

    f64 = ["--set", "dtype=float64", *SMALL]
    path = tmp_path / f"batch{suffix}"
    assert runner.invoke(app, ["dump", "-o", str(path), *f64]).exit_code == 0
    direct = build_batch(
        validate({"dtype": "float64", "source": {"vocab_size": 200, "num_sequences": 8}})
    )
    read = build_batch(validate({"dtype": "float64", "source": {"path": str(path)}}))
    assert read.hidden.dtype == read.old_logp.dtype == torch.float64
    t = read.mask.shape[1]  # a .jsonl line stops at its last token: the grid can be narrower
    assert not direct.mask[:, t:].any()
    m = direct.mask[:, :t]
    assert torch.equal(read.mask, m)
    assert torch.equal(read.hidden[m], direct.hidden[:, :t][m])  # bit for bit: no float32
    assert torch.equal(read.weight, direct.weight)
    assert torch.equal(read.advantages[m], direct.advantages[:, :t][m])


def test_a_batch_written_by_a_plain_torch_script(tmp_path):
    # What a user dumps from a training loop: verl's key names, rewards instead of advantages.
    gen = torch.Generator().manual_seed(1)
    n, t, h, v = 4, 5, 3, 11
    hidden = torch.randn(n, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    responses = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 3:] = 0  # a shorter response
    logits = hidden @ weight.T
    old = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    torch.save(
        {
            "responses": responses,
            "response_mask": mask,
            "old_log_probs": old,
            "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0]),
            "hidden_states": hidden,
            "lm_head_weight": weight,
        },
        tmp_path / "dump.pt",
    )
    report = compare_json(
        "--set",
        f"source.path={tmp_path / 'dump.pt'}",
        "--set",
        "source.group_size=2",
        "--set",
        "dtype=float64",
    )
    assert report["batch"]["num_tokens"] == 18
    assert "rewards" in report["batch"]["advantages"]
    # on-policy old log-probs, computed by the script in float32 (the analysis runs in
    # float64): every ratio is 1 to float32 rounding of ℓ (|ℓ| ≲ 10: ~1e-6), nothing clipped
    assert report["ratio"]["max"] == pytest.approx(1.0, abs=1e-5)
    assert report["ratio"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert {r["name"]: r["clipping"]["region"] for r in report["losses"]}["ppo_clip"] == 0.0
    assert report["passed"]


def bad(tmp_path, tensors: dict, name: str = "bad.pt") -> str:
    torch.save(tensors, tmp_path / name)
    result = runner.invoke(app, ["compare", "--set", f"source.path={tmp_path / name}"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def good() -> dict:
    return {
        "responses": torch.zeros(2, 3, dtype=torch.long),
        "response_mask": torch.ones(2, 3),
        "old_log_probs": -torch.ones(2, 3),
        "advantages": torch.ones(2),
        "hidden_states": torch.randn(2, 3, 4),
        "lm_head_weight": torch.randn(5, 4),
    }


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("old_log_probs"), "no 'old_log_probs' / 'old_log_prob'"),
        (lambda d: d.pop("response_mask"), "no 'response_mask' / 'attention_mask'"),
        (lambda d: d.pop("advantages"), "needs 'advantages' or 'rewards'"),
        (lambda d: d.pop("lm_head_weight"), "'lm_head_weight' is missing"),
        (lambda d: d.update(old_log_probs=torch.zeros(2, 4)), "'old_log_probs' has shape (2, 4)"),
        (lambda d: d.update(responses=torch.full((2, 3), 9)), "outside the vocabulary [0, 5)"),
        (lambda d: d.update(hidden_states=torch.randn(2, 3, 7)), "'lm_head_weight' has shape"),
        (
            lambda d: d.update(old_log_probs=torch.full((2, 3), float("nan"))),
            "'old_log_probs'[0, 0]: NaN",
        ),
    ],
)
def test_bad_batch_files_name_the_key(tmp_path, change, expected):
    tensors = good()
    change(tensors)
    assert expected in bad(tmp_path, tensors)


def test_missing_file_and_unknown_format(tmp_path):
    result = runner.invoke(
        app,
        ["compare", "--set", "source.kind=batch", "--set", f"source.path={tmp_path / 'nope.pt'}"],
    )
    assert result.exit_code == 2 and "no such file" in result.stderr
    (tmp_path / "x.csv").write_text("a,b\n")
    result = runner.invoke(
        app, ["compare", "--set", "source.kind=batch", "--set", f"source.path={tmp_path / 'x.csv'}"]
    )
    assert result.exit_code == 2 and "unknown format '.csv'" in result.stderr


# --- tensor parallelism: a rank's rows of the lm_head ------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".jsonl"])
def test_a_rank_keeps_its_rows_of_a_whole_lm_head_at_load(tmp_path, suffix):
    path = tmp_path / f"batch{suffix}"
    tensors = {**good(), "lm_head_weight": torch.arange(20.0).reshape(5, 4)}
    write_batch(
        path,
        {
            "tokens": tensors["responses"],
            "mask": tensors["response_mask"],
            "old_logp": tensors["old_log_probs"],
            "advantages": tensors["advantages"],
            "hidden": tensors["hidden_states"],
            "weight": tensors["lm_head_weight"],
        },
    )
    chosen = []

    def keep_rows(vocab: int) -> tuple[int, int]:
        chosen.append(vocab)
        return 2, 4

    data = read_batch_tensors(path, keep_rows=keep_rows)
    assert chosen == [5]  # asked with the whole lm_head's V
    assert torch.equal(data["weight"].float(), torch.arange(8.0, 16.0).reshape(2, 4))  # rows 2, 3
    assert data["weight_rows"].tolist() == [2, 4, 5]
    whole = read_batch_tensors(path)
    assert whole["weight_rows"].tolist() == [0, 5, 5] and whole["weight"].shape == (5, 4)


@pytest.mark.parametrize("as_tensors", [True, False])  # plain ints are how a script writes them
def test_a_file_of_one_ranks_rows_says_which_rows_it_holds(tmp_path, as_tensors):
    offset, vocab = (torch.tensor(3), torch.tensor(8)) if as_tensors else (3, 8)
    tensors = {**good(), "vocab_offset": offset, "vocab_size": vocab}
    tensors["responses"] = torch.tensor([[0, 7, 3], [1, 2, 5]])  # ids of the whole vocabulary
    torch.save(tensors, tmp_path / "rank1.pt")
    # holds rows 3…7 of 8; the ids are checked against V = 8, not against its 5 rows
    data = read_batch_tensors(tmp_path / "rank1.pt", keep_rows=lambda v: (0, 1))  # not re-split
    assert data["weight_rows"].tolist() == [3, 8, 8]
    assert data["weight"].shape == (5, 4)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(vocab_offset=torch.tensor(0)), "'vocab_offset' without 'vocab_size'"),
        (
            lambda d: d.update(vocab_offset=torch.tensor(4), vocab_size=torch.tensor(8)),
            "holds 5 rows from vocab_offset 4, outside the vocabulary [0, 8)",
        ),
        (
            lambda d: d.update(vocab_offset=torch.tensor(0.5), vocab_size=torch.tensor(8)),
            "'vocab_offset' must be one integer",
        ),
        (
            lambda d: d.update(vocab_offset=torch.tensor(0), vocab_size=torch.tensor(8)),
            "holds rows [0, 5) of the lm_head's 8 (one tensor-parallel rank's",
        ),
    ],
)
def test_bad_rank_files_name_the_key(tmp_path, change, expected):
    tensors = good()
    change(tensors)
    assert expected in " ".join(bad(tmp_path, tensors).split())


def test_source_tokenizer_decodes_the_largest_tokens(tmp_path):
    # a file with stored hidden states and no checkpoint: source.tokenizer names what decodes
    # its ids (here the built-in model's, 2,048 entries)
    g = torch.Generator().manual_seed(5)
    tensors = {
        "responses": torch.randint(1, 2048, (2, 6), generator=g),
        "response_mask": torch.ones(2, 6),
        "old_log_probs": torch.full((2, 6), -3.0),
        "advantages": torch.tensor([1.0, -1.0]),
        "hidden_states": torch.randn(2, 6, 8, generator=g),
        "lm_head_weight": torch.randn(2048, 8, generator=g),
    }
    torch.save(tensors, tmp_path / "b.pt")
    path = f"source.path={tmp_path / 'b.pt'}"
    report = compare_json("--set", path, "--set", "source.tokenizer=builtin")
    tokenizer = load_tokenizer("builtin")
    ids = tensors["responses"].tolist()
    for loss in report["losses"]:
        top = loss["attribution"]["top_tokens"]
        assert top
        for t in top:
            word = tokenizer.decode([t["token"]])
            assert t["text"] == word
            row, k = ids[t["sequence"]], t["position"]
            before, after = tokenizer.decode(row[max(0, k - 8) : k]), tokenizer.decode(row[k + 1 :])
            assert t["context"] == f"{before}«{word}»{after}"
        for seq in loss["attribution"]["top_sequences"]:
            assert seq["text"] == tokenizer.decode(ids[seq["sequence"]])
    plain = compare_json("--set", path)  # no tokenizer: ids only
    assert plain["losses"][0]["attribution"]["top_tokens"][0]["text"] is None
    missing = runner.invoke(
        app, ["compare", "--set", path, "--set", f"source.tokenizer={tmp_path / 'none'}"]
    )
    assert missing.exit_code == 2
    assert "source.tokenizer:" in missing.stderr and "does not exist" in missing.stderr


def test_a_jsonl_batch_beyond_what_the_memory_can_parse_is_refused_unread(tmp_path, monkeypatch):
    import gradlens.batchfile as batchfile

    path = tmp_path / "batch.jsonl"
    gen = torch.Generator().manual_seed(0)
    write_batch(
        path,
        {
            "tokens": torch.tensor([[0, 1, 2], [3, 4, 0]]),
            "mask": torch.ones(2, 3),
            "old_logp": -torch.rand(2, 3, generator=gen) - 0.1,
            "advantages": torch.tensor([1.0, -1.0]),
            "hidden": torch.randn(2, 3, 4, generator=gen),
            "weight": torch.randn(5, 4, generator=gen),
        },
    )
    size = path.stat().st_size
    factor = batchfile.JSONL_PARSE_FACTOR
    room = factor * size  # exactly enough: read
    monkeypatch.setattr(batchfile, "available", lambda device: (room, "a test"))
    assert read_batch_tensors(path)["tokens"].shape == (2, 3)
    room = factor * size - 1  # one byte short: refused, naming the size, the room and the way out
    with pytest.raises(GradlensError) as refused:
        read_batch_tensors(path)
    message = str(refused.value)
    assert "source.path" in message and "batch.jsonl" in message and ".safetensors" in message
    assert f"{factor}×" in message and "more than the" in message


def test_a_jsonl_mask_may_be_written_as_booleans(tmp_path):
    line = {"responses": [0, 1, 2], "old_log_probs": [-0.5, -0.7, -0.2], "advantages": 1.0}
    as_numbers, as_booleans = tmp_path / "n.jsonl", tmp_path / "b.jsonl"
    as_numbers.write_text(json.dumps({**line, "response_mask": [1, 1, 0]}) + "\n")
    as_booleans.write_text(json.dumps({**line, "response_mask": [True, True, False]}) + "\n")
    numbers, booleans = read_batch_tensors(as_numbers), read_batch_tensors(as_booleans)
    assert torch.equal(numbers["mask"], booleans["mask"]) and numbers["mask"].tolist() == [
        [True, True, False]
    ]


def test_keys_a_batch_file_holds_but_gradlens_does_not_read_are_named(tmp_path):
    # a trainer's dump holds more (values, uid, ...), and a misspelt key reads as one of them;
    # rewards beside advantages are not used either, and the report says both
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "b.pt"
    torch.save(
        {
            "responses": torch.tensor([[0, 1, 2], [3, 4, 0]]),
            "response_mask": torch.ones(2, 3),
            "old_log_probs": -torch.rand(2, 3, generator=gen) - 0.1,
            "advantages": torch.tensor([1.0, -1.0]),
            "token_level_rewards": torch.ones(2, 3),
            "hidden_states": torch.randn(2, 3, 4, generator=gen),
            "lm_head_weight": torch.randn(5, 4, generator=gen),
            "values": torch.zeros(2, 3),
            "rollout_logprobs": torch.zeros(2, 3),  # misspelt: rollout_log_probs
            "uid": ["a", "b"],  # no tensor: named too
        },
        path,
    )
    batch = compare_json("--set", f"source.path={path}")["batch"]
    assert batch["source"].endswith("; keys not read: rollout_logprobs, uid, values")
    assert batch["advantages"] == "read from the file (its 'token_level_rewards' not used)"
    data = torch.load(path)
    for key in ("token_level_rewards", "values", "rollout_logprobs", "uid"):
        del data[key]
    torch.save(data, path)
    batch = compare_json("--set", f"source.path={path}")["batch"]
    assert "not read" not in batch["source"] and batch["advantages"] == "read from the file"


def test_token_rewards_off_the_mask_are_padding_even_when_not_finite(tmp_path):
    # [N, T] rewards are summed over the response mask; a NaN in the padding is no reward
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0]])
    base = {
        "responses": torch.tensor([[0, 1, 2], [3, 4, 0]]),
        "response_mask": mask,
        "old_log_probs": -torch.rand(2, 3, generator=gen) - 0.1,
        "hidden_states": torch.randn(2, 3, 4, generator=gen),
        "lm_head_weight": torch.randn(5, 4, generator=gen),
    }
    torch.save({**base, "token_level_rewards": rewards}, tmp_path / "zero.pt")
    torch.save(
        {**base, "token_level_rewards": rewards.masked_fill(mask == 0, float("nan"))},
        tmp_path / "nan.pt",
    )
    zero, nan = (
        compare_json("--set", f"source.path={tmp_path / name}", "--set", "source.group_size=2")
        for name in ("zero.pt", "nan.pt")
    )
    assert nan["passed"] and nan["batch"]["advantages"] == zero["batch"]["advantages"]
    for a, b in zip(nan["losses"], zero["losses"], strict=True):
        assert a["rows"]["total_norm"] == b["rows"]["total_norm"] > 0
