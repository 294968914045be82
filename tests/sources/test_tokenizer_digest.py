"""A dump records which tokenizer made its ids; a read-back with another one is refused.

Two random Llama checkpoints with the same weights and a vocabulary of the same size, one behind
the code BPE tokenizer, one behind the instruct tokenizer (other tokens, other ids): every range
check passes for either, so before ``tokenizer_sha256`` the second recomputed a batch of other
tokens and `--check` passed it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gradlens.batchfile import read_batch_tensors
from gradlens.cli import app
from gradlens.sources.checkpoint import load_tokenizer
from gradlens.sources.tokenizer_digest import hex_digest, vocabulary_sha256
from tests.cli.test_bad_input import batch_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tiny_checkpoints import (  # noqa: E402
    VOCAB,
    make_instruct_tokenizer,
    make_tokenizer,
    save_checkpoint,
)

runner = CliRunner()
PROMPTS = ["def add(a, b):\n", "import os\n"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digest")
    return {
        "code": save_checkpoint(root / "code", "llama"),
        "instruct": save_checkpoint(
            root / "instruct", "llama", tokenizer=make_instruct_tokenizer()
        ),
    }


def test_the_digest_is_of_the_token_to_id_map_alone(checkpoints: dict[str, Path]) -> None:
    code = load_tokenizer(str(checkpoints["code"]))
    digest = vocabulary_sha256(code)
    assert digest is not None and digest.dtype == torch.uint8 and digest.shape == (32,)
    # the same vocabulary through the tokenizers library (another class, the file alone)
    plain = load_tokenizer(str(checkpoints["code"] / "tokenizer.json"))
    assert type(plain) is not type(code)
    assert torch.equal(vocabulary_sha256(plain), digest)
    assert torch.equal(vocabulary_sha256(make_tokenizer()), digest)  # rebuilt: same training
    # one size, other tokens at the ids: another digest
    instruct = load_tokenizer(str(checkpoints["instruct"]))
    assert len(instruct) == len(code) == VOCAB
    assert not torch.equal(vocabulary_sha256(instruct), digest)
    # one special token more (which shifts nothing before it) changes it too
    extra = make_tokenizer(extra_tokens=1)
    assert not torch.equal(vocabulary_sha256(extra), digest)
    assert vocabulary_sha256(object()) is None  # cannot list its vocabulary: nothing to compare
    assert len(hex_digest(digest)) == 64


def dump(path: Path, checkpoint: Path, tmp: Path) -> None:
    cfg = {
        "losses": ["reinforce", "ppo_clip"],
        "source": {
            "kind": "model", "path": str(checkpoint), "prompts": PROMPTS, "group_size": 2,
            "max_new_tokens": 6, "reward": "length", "rollout_dtype": "float32",
        },
    }  # fmt: skip
    config = tmp / "model.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["dump", "-c", str(config), "-o", str(path)])
    assert result.exit_code == 0, result.output


def compare(path: Path, *sets: str) -> tuple[int, str]:
    args = ["compare", "--check", "--set", f"source.path={path}"]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, [*args, "--set", "losses=[reinforce,ppo_clip]"])
    return result.exit_code, result.output + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".jsonl"])
def test_a_read_back_with_another_tokenizer_of_the_same_size_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"batch{suffix}"
    dump(path, checkpoints["code"], tmp_path)
    stored = read_batch_tensors(path)["tokenizer_sha256"]
    code = vocabulary_sha256(load_tokenizer(str(checkpoints["code"])))
    assert torch.equal(stored, code)
    if suffix == ".jsonl":  # one value for the batch: the first line alone holds it
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(lines[0]["tokenizer_sha256"]) == 32
        assert all("tokenizer_sha256" not in x for x in lines[1:])

    # the checkpoint that made it: recomputed and diagnosed
    rc, out = compare(path, f"source.model_path={checkpoints['code']}")
    assert rc == 0, out
    # the same weights behind another vocabulary of 300 tokens: refused, both digests named
    rc, out = compare(path, f"source.model_path={checkpoints['instruct']}")
    assert rc == 2, out
    other = vocabulary_sha256(load_tokenizer(str(checkpoints["instruct"])))
    assert "source.model_path: the tokenizer of" in out and "'tokenizer_sha256'" in out
    assert hex_digest(stored)[:16] in out and hex_digest(other)[:16] in out
    assert "Traceback" not in out
    assert "recompute" not in out  # refused by the tokenizer alone, before the model loads
    # a tokenizer only to decode the tokens: the same rule
    rc, out = compare(path, f"source.tokenizer={checkpoints['instruct']}")
    assert rc == 2 and "source.tokenizer: the tokenizer of" in out, out
    rc, out = compare(path, f"source.tokenizer={checkpoints['code']}")
    assert rc == 0, out


@pytest.mark.slow
def test_a_re_dump_with_the_checkpoint_keeps_the_digest(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    first = tmp_path / "first.safetensors"
    dump(first, checkpoints["code"], tmp_path)
    again = tmp_path / "again.pt"
    sets = ["--set", f"source.path={first}", "--set", f"source.model_path={checkpoints['code']}"]
    result = runner.invoke(app, ["dump", "-o", str(again), *sets])
    assert result.exit_code == 0, result.output
    assert torch.equal(
        read_batch_tensors(again)["tokenizer_sha256"], read_batch_tensors(first)["tokenizer_sha256"]
    )


def test_a_file_without_the_digest_reads_as_before(tmp_path: Path) -> None:
    # trainers' files do not have it: nothing to compare, nothing refused
    rc, out = compare(Path(batch_file(tmp_path)), "source.tokenizer=builtin")
    assert rc == 0 and "tokenizer_sha256" not in out, out
