"""The refactored code reproduces the reports recorded before it, field for field.

``tests/golden/*.json`` hold the JSON reports of every shipped config and of the command lines
in ``tests/golden/cases.py``. Each is re-run here and compared: strings, integers and booleans
exactly; floats to a relative 1e-5 (a reordering of float32 operations moves the last digits,
a wrong formula moves far more). Rounding residuals (zero-sum sums, closed form vs autograd
differences), which any reordering changes completely, are compared by their verdicts only:
the ``passed`` flags beside them are compared exactly, and the words of each check's detail
(its numbers are such residuals or fields compared elsewhere). A list of numbers is compared
as one vector (each entry to 1e-5 of the largest, `tests.helpers.differences`), and a loss
value to 1e-5 of the batch's mean |A| as well, the mismatch's log_ppl_diff to 1e-5 of the two
log-perplexities it is the difference of (`cancelling_sums`), and the shares of a ranked list
of records to 1e-5 of its largest share: all are sums whose rounding follows their terms, not
their value. ``environment`` describes the machine and is
skipped. `upgrade` applies the documented schema changes to the old reports.

The cases of ``cases.PLATFORM_BOUND`` sample from a model on the CPU: their reports are the
ones recorded on the running CPU's platform (tests/cpu_kernels.py), skipped where none is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))

from cases import cases  # noqa: E402
from helpers import NUMBER, differences  # noqa: E402
from record import golden_file, normalise, run_case, unrecorded  # noqa: E402

from gradlens.config import LossConfig  # noqa: E402
from gradlens.metric_names import METRIC_NAMES  # noqa: E402

# docs/json-schema.md's changelog, "Added fields": the settings of the losses of docs/losses.md
# §2.14–§2.27, of the top-entropy selection (§2.28) and verl's bypass mode (§2.12) joined
# ``config.loss`` with these defaults, which leave every earlier loss unchanged.
ADDED_LOSS_SETTINGS = (
    "dppo_tv_low",
    "dppo_tv_high",
    "dppo_kl_low",
    "dppo_kl_high",
    "dppo_cap",
    "prime_mask_low",
    "prime_mask_high",
    "prime_kl_tau",
    "ipo_threshold",
    "m2po_threshold",
    "aspo_eps_low_entropy",
    "aspo_eps_high_entropy",
    "aspo_entropy_quantile",
    "aspo_clip_c_neg",
    "aspo_clip_c_pos",
    "gppo_beta1",
    "gppo_beta2",
    "clip_cov_ratio",
    "clip_cov_lb",
    "clip_cov_ub",
    "selection_seed",
    "kl_cov_ratio",
    "kl_cov_coef",
    "gmpo_eps_low",
    "gmpo_eps_high",
    "topr_pos_weight",
    "topr_neg_weight",
    "dro_beta",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "real_tau",
    "fipo_decay_rate",
    "fipo_clip_range",
    "fipo_clip_high_only",
    "fipo_safety_threshold",
    "top_entropy_quantile",
    "bypass_mode",
    "distill",  # the distillation term of §2.29, null: off
)


def upgrade(report: dict[str, Any]) -> dict[str, Any]:
    """A golden report recorded under ``gradlens.compare/1`` or an earlier ``/3`` in today's
    schema: the renamed and added fields of docs/json-schema.md's changelog, nothing else; every
    step leaves a report that already has its fields as it is. The attribution section (added
    in ``/3``) is compared where it was recorded, `recorded_sections`."""
    report = json.loads(json.dumps(report))
    if "check" in report:  # a sweep summary (gradlens.sweep/1 → /2)
        for loss in report["losses"]:
            if "coefficient" in loss:
                loss["per_token_grad_formula"] = loss.pop("coefficient")
        _loss_settings_of_3(report["config"]["loss"])
        _sampling_support(report)
        _split(report)
        _sweep_support(report)
        return _added_fields(report)
    for loss in report["losses"]:
        if "coefficient_formula" in loss:
            loss["per_token_grad_formula"] = loss.pop("coefficient_formula")
    if report["engine"]["reason"].startswith("the whole-model gradients"):
        # a real checkpoint no longer forces the materialized engine (issue: the model source
        # streams); below the threshold it is chosen by size, as for every source
        entries = report["batch"]["num_tokens"] * report["batch"]["vocab_size"]
        report["engine"]["reason"] = f"tokens × vocabulary = {entries} ≤ {1 << 24}"
    report["config"]["diagnostics"].setdefault("stream_above", 1 << 24)
    # added with tensor parallelism (one process: 1 rank, no split)
    report["config"]["diagnostics"].setdefault("tensor_parallel", 1)
    report["config"]["diagnostics"].setdefault("collective_timeout_s", 300.0)
    report["engine"].setdefault("tensor_parallel", 1)
    report["engine"].setdefault("vocab_rows", None)
    # added in gradlens.compare/3 with the attribution section
    report["config"]["diagnostics"].setdefault("attribution", "auto")
    if report["config"]["source"]["kind"] == "batch":
        report["config"]["source"].setdefault("tokenizer", None)
        # added with the packed passes of a batch file's checkpoint (on by default)
        report["config"]["source"].setdefault("shared_prefix", True)
    mismatch = (report.get("model") or {}).get("mismatch")
    if mismatch is not None and "mean_abs_diff" in mismatch:
        mismatch["abs_diff_mean"] = mismatch.pop("mean_abs_diff")
        mismatch["abs_diff_max"] = mismatch.pop("max_abs_diff")
        mismatch["rho_mean"] = report["rollout"]["rho_mean"]  # the same statistics now
    report = upgrade_to_3(report)
    _sampling_support(report)
    _agreement_scope(report)
    _split(report)
    return _added_fields(report)


def upgrade_to_3(report: dict[str, Any]) -> dict[str, Any]:
    """``gradlens.compare/2`` → ``/3`` (docs/json-schema.md's changelog): parity is a list of
    pairs, two loss settings were added with their defaults, and the crosswalk was corrected
    (its rows are a constant table, checked by tests/compare/test_parity.py)."""
    _loss_settings_of_3(report["config"]["loss"])
    for check in report["checks"]:  # a failed check's detail says > where /2 said ≤
        if not check["passed"]:
            check["detail"] = check["detail"].replace(" ≤ ", " > ")
    parity = report["config"].get("parity")
    if parity is not None and "losses" in parity:
        parity["pairs"] = [parity.pop("losses")]
    if not isinstance(report.get("parity"), list):
        report["parity"] = [] if report.get("parity") is None else [report["parity"]]
    report["metric_names"] = [m.model_dump(mode="json") for m in METRIC_NAMES]
    return report


def _sampling_support(report: dict[str, Any]) -> None:
    """The fields the top-p/top-k replay added, with their defaults (docs/json-schema.md's
    changelog): ``loss.sampling_support`` full and the model source's ``top_k`` 0 (off). The
    ``support`` section itself is compared where it was recorded, `recorded_sections`."""
    config = report["config"]
    config["loss"].setdefault("sampling_support", "full")
    if config.get("source", {}).get("kind") == "model":
        config["source"].setdefault("top_k", 0)
    if "check" in report:  # a sweep summary has no batch sections
        return
    rollout = (report.get("model") or {}).get("rollout")
    if rollout is not None:
        rollout.setdefault("top_k", 0)


def _agreement_scope(report: dict[str, Any]) -> None:
    """The fields the sampled agreement check added (docs/json-schema.md's changelog): a report
    recorded before it checked every token and row, or nothing (scope full, no samples)."""
    for loss in report["losses"]:
        agreement = loss["agreement"]
        agreement.setdefault("scope", "full")
        agreement.setdefault("sampled_tokens", None)
        agreement.setdefault("sampled_rows", None)
        # ∂L/∂W is left unjudged where the inputs make it zero or rounding (added later)
        unjudged = loss["signal"]["from_inputs"] and agreement.get("ran", True)
        agreement.setdefault("weight_judged", not unjudged)


def _split(report: dict[str, Any]) -> None:
    """``--split`` added the ``split`` config section and report section, both null unless
    asked for (docs/json-schema.md's changelog)."""
    if not str(report.get("schema_version", "")).startswith("gradlens.compare/"):
        return  # a sweep's config and report have no split
    report["config"].setdefault("split", None)
    report.setdefault("split", None)


def _sweep_support(report: dict[str, Any]) -> None:
    """The sweep's ``support`` section (the rollout's kept set at every point, docs/sweep.md),
    added at its defaults: no kept set, the same maths as before (docs/json-schema.md's
    changelog)."""
    report["config"].setdefault(
        "support", {"kept_mass": 1.0, "old_kept_mass": None, "old_logp": "full"}
    )


def _loss_settings_of_3(loss: dict[str, Any]) -> None:
    """The loss settings /3 added, with their defaults (the same maths as before)."""
    loss.setdefault("count_empty_sequences", False)
    for correction in loss.get("corrections", []):
        correction.setdefault("renormalize", False)


# the findings the attribution section adds (gradlens.compare.findings.attribution_notes)
ATTRIBUTION = re.compile(
    r"of the lm_head update comes from|of the policy term's share|^no attribution"
)


def recorded_sections(new: dict[str, Any], golden: dict[str, Any]) -> dict[str, Any]:
    """``new`` without the sections a golden report recorded before they existed: each loss's
    ``attribution`` (gradlens.compare/3) and its findings where the golden loss has none, and
    the ``support`` section (the rollout's kept sets, /3) and the ``mismatch`` section where the
    golden report has none.
    Every other number of the report must still be the recorded one."""
    if "check" in new:  # a sweep summary
        return new
    new = json.loads(json.dumps(new))
    if "support" not in golden:
        new.pop("support", None)
    if "mismatch" not in golden:  # the gap localised (docs/mismatch.md), added in /3
        new.pop("mismatch", None)
    for loss, old in zip(new["losses"], golden["losses"], strict=False):
        if "attribution" not in old:
            loss.pop("attribution", None)
            loss["findings"] = [f for f in loss["findings"] if not ATTRIBUTION.search(f)]
    return new


def _added_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The fields added without a new schema version, at their defaults."""
    loss = report["config"]["loss"]
    for name in ADDED_LOSS_SETTINGS:
        loss.setdefault(name, LossConfig.model_fields[name].default)
    for correction in loss.get("corrections", []):
        correction.setdefault("batch_normalize", False)
    if "check" in report:  # a sweep summary: a loss's own words for its rules
        for info in report["losses"]:
            info.setdefault("rule_words", {})
        return report
    source = report["config"]["source"]
    for sequence in source.get("sequences") or []:
        sequence.setdefault("group", None)  # a literal sequence's prompt group
        for position in sequence["positions"]:  # a literal position's distillation teacher
            for name in TEACHER_POSITION_FIELDS:
                position.setdefault(name, None)
    if source.get("kind") == "synthetic":  # the synthetic source's distillation teacher
        source.setdefault("teacher", "none")
        source.setdefault("teacher_scale", 0.1)
    if source.get("kind") == "model":  # the mismatch switches and the teacher, at their defaults
        source.setdefault("rollout_logprobs", "cache")
        source.setdefault("train_pass", "batch")
        source.setdefault("teacher_path", None)
        source.setdefault("device_map", None)  # accelerate's placement
        # the stale steps' backward precision: in the model's dtype before the setting existed
        source["stale"].setdefault("grad_dtype", "model")
    model = report.get("model") or {}
    passes = [model.get("gradient_pass"), (model.get("staleness") or {}).get("model_pass")]
    for model_pass in passes:
        if model_pass is not None:  # the blocks recomputed in the model's own dtype
            model_pass.setdefault("recompute_dtype", None)
    return report


# a literal position's teacher fields, added with the distillation teacher (null: none)
TEACHER_POSITION_FIELDS = (
    "teacher_logits",
    "teacher_probs",
    "teacher_topk_ids",
    "teacher_topk_probs",
    "teacher_logp",
)


@pytest.mark.parametrize(
    "name, argv, setup",
    [
        pytest.param(name, argv, setup, id=name, marks=[pytest.mark.slow] if slow else [])
        for name, argv, slow, setup in cases()
    ],
)
def test_report_reproduces_golden(name: str, argv: list[str], setup, tmp_path: Path) -> None:
    missing = unrecorded(name)
    if missing is not None:
        pytest.skip(
            f"{name} samples from a model on the CPU: {missing}; record it with python "
            f"tests/golden/record.py {name}"
        )
    golden = json.loads(golden_file(name).read_text())
    report = run_case(argv, setup, tmp_path)
    old = upgrade(golden)
    new = recorded_sections(normalise(report, str(tmp_path)), old)
    diffs = differences(old, new, scales=cancelling_sums(old))
    assert not diffs, "\n".join(diffs[:40])


def cancelling_sums(report: dict[str, Any]) -> dict[str, float]:
    """The numbers that are differences of far larger terms, each with the size of its terms.

    The loss values: a policy loss is a weighted mean of terms A_t·(a function of r_t ≈ 1), and
    with advantages centred in each group it cancels to far below them (−9.1e-5 against a mean
    |A| of 0.46 in train_inference_mismatch, where a float32 sum in another order moved it by
    2.5e-5 of itself). The mismatch's log_ppl_diff: the training engine's log-perplexity less
    the rollout's (4.3e-4 from two of 0.511, moved by 1.5e-5 of itself with a CPU's own
    kernels)."""
    out: dict[str, float] = {}
    scale = (report.get("batch") or {}).get("mean_abs_advantage")
    if isinstance(scale, (int, float)):
        out.update({f".losses[{i}].loss": float(scale) for i in range(len(report["losses"]))})
    stats = (report.get("mismatch") or {}).get("statistics") or {}
    sides = [stats.get(k) for k in ("training_log_ppl", "rollout_log_ppl")]
    if all(isinstance(x, (int, float)) for x in sides):
        out[".mismatch.statistics.log_ppl_diff"] = max(abs(float(x)) for x in sides)
    return out


def test_the_scaled_comparisons_still_fail_a_changed_number() -> None:
    # a share 4e5 times below the largest, or a difference of two log-perplexities, is held to
    # the size of what it is computed from; a change of the size a wrong formula makes still
    # fails, and the terms themselves are held to 1e-5 of their own value
    old = upgrade(json.loads(golden_file("train_inference_mismatch").read_text()))

    def changed(path: tuple[Any, ...], factor: float) -> list[str]:
        new = json.loads(json.dumps(old))
        *parents, last = path
        holder = new
        for key in parents:
            holder = holder[key]
        holder[last] *= factor
        return differences(old, new, scales=cancelling_sums(old))

    sequences = ("losses", 3, "attribution", "top_sequences")
    assert old["losses"][3]["attribution"]["top_sequences"][7]["share"] < 1e-5
    assert changed((*sequences, 7, "share"), 1 + 1e-4) == []  # rounding-sized: 4e-11 absolute
    assert changed((*sequences, 7, "share"), 1e6) != []
    assert changed((*sequences, 0, "share"), 1 + 1e-4) != []
    stats = ("mismatch", "statistics")
    assert changed((*stats, "log_ppl_diff"), 1 + 1e-4) == []
    assert changed((*stats, "log_ppl_diff"), 1.2) != []
    assert changed((*stats, "training_log_ppl"), 1 + 1e-4) != []


def structure(value: Any, path: str = "") -> dict[str, Any]:
    """Every field of a report that is not a measured number: strings (the numbers written in
    them as #), booleans, nulls, keys and list lengths, path by path (a histogram's counts are
    measured numbers too)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {f"{path}{{}}": sorted(value)}
        for key, item in value.items():
            out.update(structure(item, f"{path}.{key}"))
        return out
    if isinstance(value, list):
        out = {f"{path}[]": len(value)}
        for i, item in enumerate(value):
            out.update(structure(item, f"{path}[{i}]"))
        return out
    if isinstance(value, str):
        return {path: NUMBER.sub("#", value)}
    count = isinstance(value, int) and not isinstance(value, bool) and ".histogram" in path
    return {} if isinstance(value, float) or count else {path: value}


@pytest.mark.parametrize(
    "path",
    sorted((GOLDEN / "platforms").glob("*/*.json")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_a_platform_recording_differs_from_the_base_one_only_in_measured_numbers(path: Path):
    # a CPU's own recording must not carry a change of the code: every string, flag, verdict,
    # count and length is the base recording's, only the numbers the kernels round may move
    base = upgrade(json.loads((GOLDEN / path.name).read_text()))
    recorded = recorded_sections(upgrade(json.loads(path.read_text())), base)
    base_fields, fields = structure(base), structure(recorded)
    changed = [
        k
        for k in sorted(set(base_fields) | set(fields))
        if base_fields.get(k, KeyError) != fields.get(k, KeyError)
        and k.split(".")[1] != "environment"
    ]
    assert not changed, [(k, base_fields.get(k), fields.get(k)) for k in changed[:20]]
