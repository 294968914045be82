"""The Python API: ``gradlens.diagnose`` gives ``gradlens compare``'s report on every shipped
config, reads the caller's tensors without touching them, and names the argument it rejects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import build_batch, differences

import gradlens
from gradlens.compare import run_compare
from gradlens.config import Config, build_config
from gradlens.engine.launch import run_ranks
from gradlens.engine.vocab_split import balanced_split
from gradlens.grads import effective_old_logp, softmax_view
from gradlens.validation import teacher_tensors
from tests.compare.test_tensor_parallel import assert_same_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep_"))
MODEL = {"model_builtin.yaml", "model_stale.yaml"}
# Where the API's report is the compare report's by construction only up to the source: the
# batch came as tensors, so the source description, the advantages' note and the config's
# source, advantage and seed settings (how a source builds its batch) differ.
SOURCE_FIELDS = {"source", "advantages"}


def api_report(config: Config) -> gradlens.results.CompareReport:
    batch = build_batch(config)
    old = effective_old_logp(batch, softmax_view(batch).logp)
    return gradlens.diagnose(
        batch.hidden,
        batch.weight,
        batch.tokens,
        batch.mask,
        batch.advantages,
        old,
        batch.rollout_logp,
        batch.ref_logp,
        groups=batch.groups,
        losses=config.losses,
        loss=config.loss.model_dump(),
        diagnostics=config.diagnostics.model_dump(),
        teacher=None if batch.teacher is None else teacher_tensors(batch.teacher),
    )


def comparable(report: gradlens.results.CompareReport, model: bool) -> dict:
    data = json.loads(report.model_dump_json())
    for setting in ("source", "advantage", "seed"):
        data["config"].pop(setting)
    for field in SOURCE_FIELDS:
        data["batch"].pop(field)
    if model:  # the checkpoint's sections need the checkpoint: the API gets tensors
        data.pop("model")
        data.pop("support")  # the rollout's kept sets are recorded by the sampler, not passed
        for loss in data["losses"]:
            loss.pop("model_grads")
            loss.pop("findings")
            # compare decodes with the checkpoint's tokenizer; the API here has none
            attribution = loss["attribution"] or {}
            for item in attribution.get("top_tokens", []) + attribution.get("top_sequences", []):
                item.pop("text")
                item.pop("context", None)
        for token in (data["mismatch"] or {}).get("worst", []):  # decoded the same way
            token.pop("token")
            token.pop("context")
    return data


@pytest.mark.slow  # two whole runs per config; the default alone takes seconds
@pytest.mark.parametrize("name", SHIPPED)
def test_diagnose_reproduces_compare_on_every_shipped_config(name: str) -> None:
    config = build_config(CONFIGS / name)
    report = api_report(config)
    assert report.config["source"]["kind"] == "tensors"
    expected = comparable(run_compare(config), name in MODEL)
    assert not differences(expected, comparable(report, name in MODEL))


def small_step(requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 8, generator=g).requires_grad_(requires_grad)
    weight = (0.5 * torch.randn(40, 8, generator=g)).requires_grad_(requires_grad)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {
        "hidden": hidden,
        "weight": weight,
        "tokens": torch.randint(0, 40, (3, 5), generator=g),
        "mask": mask,
        "advantages": torch.tensor([1.0, -0.5, 0.0]),
    }


def test_diagnose_never_touches_the_callers_tensors() -> None:
    step = small_step(requires_grad=True)
    before = {k: v.detach().clone() for k, v in step.items()}
    report = gradlens.diagnose(**step, diagnostics={"reference": "autograd"})
    assert report.passed
    for k, v in step.items():
        assert torch.equal(v.detach(), before[k]), k
    assert step["weight"].grad is None and step["hidden"].grad is None
    assert step["weight"].requires_grad and step["hidden"].requires_grad


def test_without_old_logp_the_batch_is_on_policy() -> None:
    report = gradlens.diagnose(**small_step(), losses=["ppo", "reinforce"])
    assert report.ratio.min == report.ratio.max == 1.0
    ppo, reinforce = report.losses
    assert ppo.rows.total_norm == reinforce.rows.total_norm  # on-policy PPO = REINFORCE


def test_metrics_are_flat_numbers_with_the_frameworks_names() -> None:
    metrics = gradlens.diagnose(**small_step(), losses=["ppo_clip"]).metrics()
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["gradlens/ppo_clip/lm_head_norm"] == metrics["gradlens/ppo_clip/rows/total_norm"]
    assert (
        metrics["gradlens/ppo_clip/verl/actor/pg_clipfrac"]
        == (metrics["gradlens/ppo_clip/clipping/region"])
    )
    assert "gradlens/verl/actor/ppo_kl" in metrics  # a shared quantity under verl's name


def test_a_bias_is_folded_into_the_weight() -> None:
    step = small_step()
    bias = torch.linspace(-1, 1, 40)
    with_bias = gradlens.diagnose(**step, bias=bias, losses=["sft"])
    assert with_bias.batch.hidden_size == 9  # [W | b]·[h; 1]
    plain = gradlens.diagnose(**step, losses=["sft"])
    assert with_bias.batch.mean_entropy != plain.batch.mean_entropy


class Letters:
    """A tokenizer of 40 ids: id i is the letter chr(ord("a") + i % 26)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_tokenizer_decodes_the_attribution_tokens() -> None:
    step = small_step()
    report = gradlens.diagnose(**step, losses=["reinforce"], tokenizer=Letters())
    a = report.losses[0].attribution
    assert a is not None and a.top_tokens and a.top_sequences
    tokens = step["tokens"].tolist()
    for t in a.top_tokens:
        word = Letters().decode([t.token])
        assert t.text == word
        # the sequence's valid tokens around it (mask[0, 3:] is off), the token in «»
        row = tokens[t.sequence][:3] if t.sequence == 0 else tokens[t.sequence]
        k = t.position
        expected = Letters().decode(row[max(0, k - 8) : k]) + f"«{word}»"
        assert t.context == expected + Letters().decode(row[k + 1 : k + 9])
    for s in a.top_sequences:
        row = tokens[s.sequence][:3] if s.sequence == 0 else tokens[s.sequence]
        assert s.text == Letters().decode(row)
    plain = gradlens.diagnose(**step, losses=["reinforce"]).losses[0].attribution
    assert plain is not None and plain.top_tokens[0].text is None  # ids only without one


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer": "gpt2"}, "tokenizer: expected an object with a decode"),
        ({"hidden": torch.zeros(3, 5)}, "hidden: expected [N, T, H]"),
        ({"weight": torch.zeros(40, 7)}, "weight: its hidden size 7"),
        ({"tokens": torch.zeros(3, 4, dtype=torch.long)}, "tokens: expected shape [3, 5]"),
        ({"tokens": torch.zeros(3, 5)}, "tokens: expected integer token ids"),
        ({"tokens": torch.full((3, 5), 40)}, "tokens[0, 0]: token id 40 is outside the vocab"),
        ({"mask": torch.zeros(3, 5, dtype=torch.bool)}, "mask: no token enters the loss"),
        ({"advantages": torch.zeros(4)}, "advantages: expected shape [3, 5]"),
        ({"old_logp": torch.full((3, 5), 0.5)}, "old_logp[0, 0]: log-probability 0.5 > 0"),
        ({"advantages": torch.full((3,), float("nan"))}, "advantages[0, 0]: NaN at a position"),
        ({"hidden": torch.full((3, 5, 8), float("inf"))}, "hidden[0, 0, 0]: +inf"),
        ({"weight": [[1.0]]}, "weight: expected a torch.Tensor"),
        ({"groups": torch.zeros(4, dtype=torch.long)}, "groups: expected shape [3]"),
        ({"groups": torch.zeros(3)}, "groups: expected integer prompt-group ids"),
        ({"losses": "ppo_clip"}, "losses=: a list of loss names"),  # not 'p', 'p', 'o', ...
        ({"losses": None}, "losses=: a list of loss names"),
        ({"loss": "eps_high"}, "loss=: a mapping of settings"),
        ({"diagnostics": "streamed"}, "diagnostics=: a mapping of settings"),
        ({"mask": torch.ones(3, 5, device="meta")}, "mask: a tensor on the meta device"),
    ],
)
def test_bad_arguments_raise_an_error_naming_them(change: dict, message: str) -> None:
    with pytest.raises(gradlens.GradlensError) as err:
        gradlens.diagnose(**{**small_step(), **change})
    assert message in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tensor_on_another_device_than_the_weight_is_named() -> None:
    step = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in small_step().items()}
    with pytest.raises(gradlens.GradlensError, match="mask is on cpu and weight on cuda"):
        gradlens.diagnose(**{**step, "mask": step["mask"].cpu()})


def test_a_group_coupled_loss_reads_the_given_groups() -> None:
    # real needs the prompt groups: without them it says how to give them; with two groups of
    # mixed-sign advantages none is skipped, with one sequence per group every one is
    step = {**small_step(), "advantages": torch.tensor([1.0, -1.0, 1.0])}
    with pytest.raises(gradlens.GradlensError, match="groups="):
        gradlens.diagnose(**step, losses=("real",))
    mixed = gradlens.diagnose(**step, losses=("real",), groups=torch.tensor([0, 0, 1]))
    shares = mixed.losses[0].clipping.sequence_shares
    assert shares["seq_group_skipped"] == pytest.approx(1 / 3)  # group 1 has no O⁻ member
    alone = gradlens.diagnose(**step, losses=("real",), groups=torch.arange(3))
    assert alone.losses[0].clipping.sequence_shares["seq_group_skipped"] == 1.0


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(gradlens.GradlensError, match=r"loss\.eps_hgh"):
        gradlens.diagnose(**small_step(), loss={"eps_hgh": 0.3})


@pytest.mark.slow
def test_the_documented_example_runs() -> None:
    """docs/api.md's example, as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    scope: dict = {}
    exec(code.group(1), scope)
    assert scope["report"].passed and 0 < scope["report"].losses[2].clipping.region < 1
    assert "gradlens/ppo_clip/verl/actor/pg_clipfrac" in scope["log"]


# --- a tensor-parallel group: process_group= and vocab_rows= ------------------------------------

VOCAB = 41  # 21 + 20 rows over two ranks: an uneven split
# (arguments of each run, both in one process and on the group)
GROUP_RUNS: list[dict] = [
    {
        "losses": ["reinforce", "ppo_clip", "grpo", "sft", "cispo"],
        "loss": {"entropy_coef": 0.05, "eps_high": 0.1},
    },
    {"losses": ["ppo", "reinforce"], "on_policy": True},  # without old_logp: ℓ_old := ℓ
]


def float64_step() -> dict:
    """A float64 step with π_old and μ drifted below π_θ (log-probs stay ≤ 0) and ragged masks."""
    g = torch.Generator().manual_seed(5)
    n, t, h = 4, 6, 8
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, h, generator=g, dtype=torch.float64) / 2
    tokens = torch.randint(0, VOCAB, (n, t), generator=g)
    tokens[0, :2] = torch.tensor([20, 21])  # the last row of rank 0, the first of rank 1
    mask = torch.arange(t)[None, :] < torch.tensor([6, 4, 5, 6])[:, None]
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, tokens[..., None]).squeeze(-1)
    noise = torch.rand(2, n, t, generator=g, dtype=torch.float64)
    return {
        "hidden": hidden,
        "weight": weight,
        "tokens": tokens,
        "mask": mask,
        "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64),
        "old_logp": logp - 0.3 * noise[0],
        "rollout_logp": logp - 0.2 * noise[1],
    }


def group_arguments(step: dict, run: dict) -> dict:
    args = {**step, **{k: v for k, v in run.items() if k != "on_policy"}}
    if run.get("on_policy"):
        args.pop("old_logp"), args.pop("rollout_logp")
    return args


def api_ranks(rank: int, world: int, step: dict) -> tuple[list[dict], list[str]]:
    """On every rank of a group the caller made (a new group over the ranks, as a trainer's
    TP group): each run's report from this rank's rows; then the errors of bad shards."""
    group = dist.new_group(list(range(world)))
    v0, v1 = balanced_split(VOCAB, world).shard(rank)
    reports = []
    for run in GROUP_RUNS:
        args = group_arguments(step, run)
        args["weight"] = args["weight"][v0:v1]
        report = gradlens.diagnose(**args, process_group=group, vocab_rows=(v0, v1))
        reports.append(report.model_dump(mode="json"))
    errors = []
    bad = [
        # rank 1's shard one row short of the rows it names
        {"weight": step["weight"][v0 : v1 - (rank == 1)], "vocab_rows": (v0, v1)},
        # every rank names rows starting at 0: they do not tile [0, V)
        {"weight": step["weight"][v0:v1], "vocab_rows": (0, v1 - v0)},
        {"weight": step["weight"][v0:v1], "vocab_rows": (v0, v1) if rank else "rows"},
    ]
    for change in bad:
        try:
            gradlens.diagnose(**{**step, **change}, process_group=group)
            errors.append("no error")
        except gradlens.GradlensError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return reports, errors


@pytest.mark.slow  # spawns gloo ranks: the full suite runs it
def test_diagnose_on_a_process_group_equals_one_process() -> None:
    step = float64_step()
    launched = run_ranks(api_ranks, 2, (step,), timeout_s=120)
    for i, run in enumerate(GROUP_RUNS):
        # one process, the streamed engine (the group runs the vocab-parallel one)
        args = group_arguments(step, run)
        one = gradlens.diagnose(**args, diagnostics={"engine": "streamed"})
        for reports, _ in launched:  # the same report on every rank, one process's
            assert_same_report(one.model_dump(mode="json"), reports[i], [21, 20])
    assert launched[1][0][1]["ratio"]["min"] == launched[1][0][1]["ratio"]["max"] == 1.0
    for _, errors in launched:  # the same error on every rank, naming the argument
        assert errors[0] == (
            "SharedError: rank 1 of 2: weight: this rank's shard has 19 rows, but vocab_rows "
            "[21, 41) names 20; pass the rows [21, 41) of the [41, H] lm_head weight"
        )
        assert errors[1] == (
            "SharedError: vocab_rows: the ranks' rows must be consecutive in rank order from 0 "
            "(rank r's v0 is rank r − 1's v1), covering the vocabulary [0, V); they are "
            "rank 0 [0, 21); rank 1 [0, 20)"
        )
        assert errors[2] == (
            "SharedError: rank 0 of 2: vocab_rows: expected two integers (v0, v1), got 'rows'"
        )


def test_vocab_rows_and_process_group_are_checked_in_one_process() -> None:
    step = small_step()
    with pytest.raises(gradlens.GradlensError, match="vocab_rows: names a shard"):
        gradlens.diagnose(**step, vocab_rows=(0, 40))
    with pytest.raises(gradlens.GradlensError, match=r"process_group: torch\.distributed is not"):
        gradlens.diagnose(**step, process_group=object(), vocab_rows=(0, 40))


def distill_step() -> dict:
    step = small_step()
    g = torch.Generator().manual_seed(5)
    teacher = {"teacher_logits": torch.randn(3, 5, 40, generator=g)}
    return {
        **step,
        "losses": ["sft"],
        "loss": {"distill": {"divergence": "forward_kl", "coef": 1.0}},
        "teacher": teacher,
    }


def test_a_teacher_given_as_logits_enters_the_distillation_term() -> None:
    step = distill_step()
    with_teacher = gradlens.diagnose(**step, diagnostics={"reference": "autograd"})
    assert with_teacher.passed  # the closed form with the term agrees with autograd
    without = gradlens.diagnose(**{k: v for k, v in step.items() if k not in ("loss", "teacher")})
    # the term changes the gradient: SFT alone against SFT + KL(q‖π) to a random teacher
    assert with_teacher.losses[0].rows.total_norm != without.losses[0].rows.total_norm


@pytest.mark.parametrize(
    "teacher, named",
    [
        ({"teacher_logit": torch.zeros(3, 5, 40)}, "unknown key(s) 'teacher_logit'"),
        ({"teacher_logits": torch.zeros(3, 5, 39)}, "teacher_logits"),
        ([torch.zeros(3, 5, 40)], "teacher: expected a mapping"),
    ],
)
def test_a_bad_teacher_is_named(teacher, named: str) -> None:
    step = {**distill_step(), "teacher": teacher}
    with pytest.raises(gradlens.GradlensError, match=re.escape(named)):
        gradlens.diagnose(**step)
