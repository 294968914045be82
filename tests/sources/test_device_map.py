"""``source.device_map``: a checkpoint placed by accelerate's device_map reports what the
checkpoint loaded whole on the run's device reports.

On a CPU-only machine: ``auto`` and ``{"": "cpu"}`` put every module on the CPU (through
accelerate's placement path rather than ``model.to(device)``), and a map that offloads two of
the four layers of the built-in model to disk runs their weights through accelerate's hooks
(the rollout then in the run's dtype, no stale steps: an offloaded layer cannot be copied to
another dtype or stepped by an optimizer). Each report must equal, field for field, the run
without a device_map; the same computation on the same device, so the numbers are compared
exactly. Under tensor parallelism each rank loads with the device_map and keeps its rows of the
lm_head (the slow test, 2 gloo ranks, to 1e-12 in float64).
"""

from __future__ import annotations

import copy

import pytest

from gradlens.compare import run_compare
from gradlens.config import build_config
from gradlens.engine.launch import run_ranks
from gradlens.engine.vocab_split import balanced_split
from gradlens.errors import GradlensError
from tests.compare.test_tensor_parallel import assert_same_report, compare_ranks, single

pytest.importorskip("accelerate")

# the built-in model, small: 2 prompts × 2 completions of ≤ 8 tokens; one stale step where the
# placement allows it
MODEL = [
    "source.kind=model",
    "source.num_prompts=2",
    "source.group_size=2",
    "source.max_new_tokens=8",
    "diagnostics.reference=none",
]
LAYERS = {f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
DISK = {
    "model.embed_tokens": "cpu",
    **LAYERS,
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def flow(mapping: dict) -> str:
    """A dict as one --set value (YAML flow style)."""
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in mapping.items()) + "}"


def report(*overrides: str) -> dict:
    return run_compare(build_config(None, [*MODEL, *overrides])).model_dump(mode="json")


def without_placement(doc: dict) -> dict:
    """The report with ``config.source.device_map`` left out (the one field that must differ)."""
    doc = copy.deepcopy(doc)
    doc["config"]["source"].pop("device_map")
    return doc


@pytest.mark.slow  # loads a checkpoint twice: the full suite runs it
@pytest.mark.parametrize(
    "placement", ["auto", "{'': cpu}", "cpu"], ids=["auto", "all-cpu", "cpu-as-transformers-takes"]
)
def test_a_device_map_on_the_cpu_reports_what_the_whole_model_reports(placement):
    base = ["dtype=float64", "source.stale.steps=1"]
    whole = report(*base)
    placed = report(*base, f"source.device_map={placement}")
    assert placed["config"]["source"]["device_map"] in ("auto", {"": "cpu"})
    assert placed["model"] is not None and placed["losses"][0]["model_grads"] is not None
    assert without_placement(placed) == without_placement(whole)


@pytest.mark.slow  # loads a checkpoint twice: the full suite runs it
def test_layers_offloaded_to_disk_report_what_the_whole_model_reports():
    # all but the whole-model gradients: an offloaded layer's parameters wait on the meta device
    # and get no gradient, so that section is left out, with a note saying why
    base = ["dtype=float32", "source.rollout_dtype=float32", "source.stale.steps=0"]
    whole = without_placement(report(*base))
    placed = report(*base, f"source.device_map={flow(DISK)}")
    assert placed["config"]["source"]["device_map"] == DISK
    placed = without_placement(placed)
    notes = placed["model"].pop("notes")
    assert notes[-1].startswith("whole-model gradients not computed: source.device_map offloads")
    assert placed["model"].pop("sft_over_rl") == [] and placed["model"].pop("gradient_pass") is None
    whole["model"].pop("sft_over_rl"), whole["model"].pop("gradient_pass")
    assert notes[:-1] == whole["model"].pop("notes")
    for doc in (placed, whole):
        for loss in doc["losses"]:
            loss.pop("model_grads"), loss.pop("findings")  # the seed post's estimate reads them
    assert placed == whole


def test_one_placement_is_the_whole_models():
    # transformers takes device_map="cpu" (or a device index) for the whole model: accelerate's
    # {"": placement}, which the report's config then shows
    assert build_config(None, [*MODEL, "source.device_map=cpu"]).source.device_map == {"": "cpu"}
    assert build_config(None, [*MODEL, "source.device_map=0"]).source.device_map == {"": 0}
    assert build_config(None, [*MODEL, "source.device_map=auto"]).source.device_map == "auto"
    for bad, why in (("''", "is empty"), ("true", "not a boolean \\(got true\\)$")):
        with pytest.raises(GradlensError, match=rf"source\.device_map: .*{why}"):
            build_config(None, [*MODEL, f"source.device_map={bad}"])


def test_placements_gradlens_cannot_run_are_errors_naming_the_field():
    with pytest.raises(GradlensError, match=r"source\.device_map: .*optimizer cannot step"):
        build_config(None, [*MODEL, "source.stale.steps=1", f"source.device_map={flow(DISK)}"])
    copied = r"source\.device_map: .*cannot be copied to the rollout"
    with pytest.raises(GradlensError, match=copied):
        report("dtype=float64", "source.stale.steps=0", f"source.device_map={flow(DISK)}")
    head_on_disk = {**DISK, "lm_head": "disk", "model.embed_tokens": "disk"}
    with pytest.raises(GradlensError, match=r"source\.device_map: .*offloads the lm_head"):
        report(
            "dtype=float32",
            "source.rollout_dtype=float32",
            "source.stale.steps=0",
            f"source.device_map={flow(head_on_disk)}",
        )


@pytest.mark.slow
def test_two_ranks_with_a_device_map_report_what_one_process_reports_without_one():
    overrides = ["dtype=float64", *MODEL[:4], "source.stale.steps=1", "source.device_map=auto"]
    reports = run_ranks(compare_ranks, 2, ([overrides],), timeout_s=600)
    one = single(["dtype=float64", *MODEL[:4], "source.stale.steps=1"])
    for rank in range(2):
        tp = reports[rank][0]
        assert tp["config"]["source"]["device_map"] == "auto"
        assert_same_report(one, tp, balanced_split(2048, 2).sizes, ("config.source.device_map",))
