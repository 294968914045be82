"""The configuration: one default per setting, every name checked against its registry, the
documented spellings accepted, plain parameters out."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradlens.batchfile import SUFFIXES
from gradlens.cli import app
from gradlens.config import (
    BATCH_SUFFIXES,
    DTYPES,
    SOURCE_KINDS,
    Config,
    LossConfig,
    build_config,
    validate,
)
from gradlens.errors import GradlensError
from gradlens.losses import Aggregation, LossParams
from gradlens.losses.base import Correction
from gradlens.sources import SOURCES

runner = CliRunner()


def test_one_default_per_loss_setting() -> None:
    """The config's defaults and the maths' defaults are the same numbers."""
    assert LossConfig().params() == LossParams()
    assert LossConfig().token_aggregation() == Aggregation()


def test_every_loss_param_has_its_config_key() -> None:
    fields = {f.name for f in dataclasses.fields(LossParams)}
    assert fields <= set(LossConfig.model_fields)
    # the config keys that are not loss parameters: three travel as the aggregation, and
    # sampling_support tells the compare pipeline to replay the batch's kept sets
    assert set(LossConfig.model_fields) - fields == {
        "aggregation",
        "loss_scale_factor",
        "count_empty_sequences",
        "sampling_support",
    }


def test_params_carry_the_configured_values_and_corrections_with_defaults() -> None:
    loss = validate(
        {"loss": {"eps_high": 0.4, "corrections": [{"kind": "icepop", "high": 4}]}}
    ).loss
    params = loss.params()
    assert params.eps_high == 0.4
    assert params.corrections == (Correction("icepop", 0.5, 4.0),)


@pytest.mark.parametrize(
    "key, value, registry",
    [
        ("loss.kl_estimator", "k4", "KL estimator"),
        ("loss.minirl_truncation", "literall", "MiniRL truncation"),
        ("loss.aggregation", "token-mean", "aggregation"),
        ("loss.corrections", [{"kind": "tis"}], "correction kind"),
    ],
)
def test_name_valued_settings_are_checked_against_their_registry(key, value, registry) -> None:
    section, name = key.split(".")
    with pytest.raises(GradlensError) as err:
        validate({section: {name: value}})
    message = str(err.value)
    assert key in message and f"unknown {registry}" in message and "valid:" in message


def test_source_kinds_are_the_source_registry() -> None:
    assert set(SOURCE_KINDS) == set(SOURCES)
    with pytest.raises(GradlensError, match="source"):
        validate({"source": {"kind": "synthetc"}})


def test_batch_suffixes_are_the_file_formats() -> None:
    assert BATCH_SUFFIXES == SUFFIXES


def test_one_dtype_map() -> None:
    assert Config().operand_dtype is DTYPES["float32"]
    assert {Config(dtype=d).operand_dtype for d in ("float64", "bfloat16")} == {
        DTYPES["float64"],
        DTYPES["bfloat16"],
    }


@pytest.mark.parametrize("spelling", ["on", "off", "auto"])
def test_token_details_documented_spelling_in_set_and_in_a_file(
    spelling: str, tmp_path: Path
) -> None:
    """YAML reads a bare on/off as a boolean; the documented spelling works anyway."""
    assert (
        build_config(None, [f"diagnostics.token_details={spelling}"]).diagnostics.token_details
        == spelling
    )
    path = tmp_path / "c.yaml"
    path.write_text(f"diagnostics:\n  token_details: {spelling}\n")
    assert build_config(path).diagnostics.token_details == spelling


def test_the_documented_token_details_command_line() -> None:
    """docs/cli.md: `gradlens compare --set diagnostics.token_details=on`."""
    result = runner.invoke(
        app,
        [
            "compare",
            "-l",
            "reinforce",
            "--set",
            "diagnostics.token_details=on",
            "--set",
            "source.vocab_size=64",
            "--set",
            "source.num_sequences=4",
            "--set",
            "source.max_length=4",
            "--set",
            "source.min_length=2",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"tokens": [' in result.stdout


@pytest.mark.parametrize(
    "loss_section, message",
    [
        ({"corrections": [{"kind": "tis"}]}, "loss.corrections[0].kind"),
        ({"corrections": [{"kind": "icepop", "low": 2, "high": 1}]}, "low (2.0) > high"),
        ({"corrections": [{"kind": "icepop"}, {"kind": "icepop"}]}, "named twice"),
        ({"kl_estimator": "k4"}, "loss.kl_estimator"),
        ({"minirl_truncation": "both"}, "loss.minirl_truncation"),
        ({"tau_neg": 0}, "loss.tau_neg"),
    ],
)
def test_bad_loss_settings_are_reported_with_their_path(loss_section: dict, message: str) -> None:
    with pytest.raises(GradlensError, match=re.escape(message)):
        validate({"loss": loss_section})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_loss_setting_beyond_float32_is_refused_where_the_losses_compute_in_it(dtype):
    # 1e39 overflowed torch's conversion to float32 inside the loss: exit 3 before
    with pytest.raises(GradlensError, match=r"loss\.eps_high: 1e\+39 is beyond float32's range"):
        validate({"dtype": dtype, "loss": {"eps_high": 1e39}})
    with pytest.raises(GradlensError, match=r"loss\.distill\.log_prob_min_clamp: -1e\+300"):
        validate({"dtype": dtype, "loss": {"distill": {"log_prob_min_clamp": -1e300}}})
    validate({"dtype": dtype, "loss": {"eps_high": 3e38}})  # within range: accepted
    validate({"dtype": "float64", "loss": {"eps_high": 1e39}})  # float64 holds it


def test_a_config_file_beyond_the_limit_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import gradlens.config as config

    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\r\n")  # Windows line ends read as text mode reads them
    monkeypatch.setattr(config, "CONFIG_BYTES", path.stat().st_size)
    assert build_config(path).seed == 1
    monkeypatch.setattr(config, "CONFIG_BYTES", path.stat().st_size - 1)
    with pytest.raises(GradlensError, match=r"c\.yaml': 9 B, more than the 8 B allowed"):
        build_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed: [1, 2\n", "line 2, column 1: expected ',' or ']', but got '<stream end>', while "
         "parsing a flow sequence at line 1, column 7"),
        ('seed: "abc\n', "line 2, column 1: found unexpected end of stream, while scanning a "
         "quoted scalar at line 1, column 7"),
        ("a: b: c\n", "line 1, column 5: mapping values are not allowed here"),
        ("seed: 1\nseed: 2\n", "line 2, column 1: found the key 'seed' a second time (first on "
         "line 1), while reading a mapping at line 1, column 1"),
    ],
)  # fmt: skip
def test_a_yaml_error_is_one_line_with_where_and_what(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(GradlensError) as refused:
        build_config(path)
    assert str(refused.value) == f"config file {str(path)!r} is not valid YAML: {expected}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.eps_low.x=1"], "loss.eps_low: Input should be a valid number (got the key "
         "loss.eps_low.x: loss.eps_low is a value, not a section)"),
        (["seed.a=1", "seed.b=2"], "seed: Input should be a valid integer (got the keys seed.a, "
         "seed.b: seed is a value, not a section)"),
    ],
)  # fmt: skip
def test_keys_under_a_value_say_it_is_not_a_section(overrides, expected):
    with pytest.raises(GradlensError) as refused:
        build_config(None, overrides)
    assert str(refused.value).endswith(expected)


def test_nesting_deeper_than_python_recurses_is_a_yaml_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("loss: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(GradlensError, match="is not valid YAML: nested too deeply"):
        build_config(path)
    with pytest.raises(GradlensError, match=r"not valid YAML \(nested too deeply"):
        build_config(None, ["loss.eps_low=" + "[" * 1000 + "]" * 1000])


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    # 10⁹ leaves once expanded: only a setting that takes numbers is searched for booleans
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join([*lines, "losses: *a8"]) + "\n")
    with pytest.raises(GradlensError, match="a8: unknown key"):
        build_config(path)


def test_a_key_written_after_a_merge_overrides_it_and_one_written_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: {<<: {eps_low: 0.1, eps_high: 0.3}, eps_low: 0.15}\n")
    loss = build_config(path).loss
    assert (loss.eps_low, loss.eps_high) == (0.15, 0.3)  # YAML's merge: the written key wins
    path.write_text("loss: {<<: {eps_low: 0.1}, eps_high: 0.2, eps_high: 0.3}\n")
    with pytest.raises(GradlensError, match="found the key 'eps_high' a second time"):
        build_config(path)


@pytest.mark.parametrize(
    ("path", "kind"), [(None, "synthetic"), ("", "synthetic"), ("b.PT", "batch"), ("d", "model")]
)
def test_the_source_kind_a_path_implies(path, kind):
    # null or empty: no path (not the directory 'None'); a batch suffix in any case
    assert build_config(None, [f"source.path={'' if path is None else path}"]).source.kind == kind


def test_a_check_across_sections_names_its_setting_not_the_top_level():
    with pytest.raises(GradlensError) as refused:
        build_config(None, ["loss.eps_high=1e308"])
    assert "\n  loss.eps_high: 1e+308 is beyond float32's range" in str(refused.value)
    assert "(top level)" not in str(refused.value)


def test_stale_steps_on_a_loss_that_needs_a_teacher_need_one():
    base = ["source.kind=model", "source.stale.loss=opd"]
    with pytest.raises(GradlensError, match=r"source\.stale\.loss: opd needs the teacher's log q"):
        build_config(None, base)
    assert build_config(None, [*base, "source.teacher_path=builtin"]).source.stale.loss == "opd"
    assert build_config(None, [*base, "source.stale.steps=0"]).source.stale.steps == 0


def test_exponent_notation_is_a_number_as_in_yaml_1_2_and_json(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-5 as a string without a dot; `Strict` refuses strings where
    # numbers go, so the loader reads it as the number a user means
    path = tmp_path / "c.yaml"
    path.write_text("loss: {eps_low: 2e-1, eps_high: 3E-1}\nsource: {kind: model, path: d, "
                    "stale: {lr: 1e-5}}\n")  # fmt: skip
    cfg = build_config(path)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.source.stale.lr) == (0.2, 0.3, 1e-5)
    assert build_config(None, ["loss.eps_high=4e-1"]).loss.eps_high == 0.4
    assert build_config(None, ["seed=1e2"]).seed == 100  # a whole float, as pydantic takes 100.0
    path.write_text("source: {kind: model, path: e5}\n")  # not a number: a name stays a name
    assert build_config(path).source.path == "e5"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed='5'", "seed: Input should be an integer, not a string"),
        ("loss.eps_low='0.2'", "loss.eps_low: Input should be a number, not a string"),
        ("seed=true", "seed: Input should be an integer, not a boolean"),
    ],
)
def test_a_quoted_number_or_a_boolean_where_a_number_goes_is_refused(override, expected):
    with pytest.raises(GradlensError, match=expected):
        build_config(None, [override])


def test_seeds_are_0_to_2_to_the_64_so_no_two_give_one_batch():
    assert build_config(None, [f"seed={2**64 - 1}"]).seed == 2**64 - 1
    with pytest.raises(GradlensError, match="seed: Input should be greater than or equal to 0"):
        build_config(None, ["seed=-1"])  # torch's generators would read it as 2⁶⁴ − 1


def test_a_key_yaml_reads_as_a_number_null_or_a_date_is_named_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  1: 2\nnull: 3\ntrue: 4\n2026-12-03: 5\n")
    with pytest.raises(GradlensError) as refused:
        build_config(path)
    text = str(refused.value)
    assert "4 problem(s)" in text
    for line in (
        "loss.1: a key must be a name, and YAML reads 1 as a number",  # not loss[1], an index
        "null: a key must be a name, and YAML reads null as no value",  # not None
        "true: a key must be a name, and YAML reads true as a boolean",
        "2026-12-03: a key must be a name, and YAML reads 2026-12-03 as date",
    ):
        assert line in text, text


def test_a_setting_of_several_forms_gets_one_line_naming_it_not_pydantics_tags():
    with pytest.raises(GradlensError) as refused:
        build_config(None, ["source.kind=model", "source.path=d", "source.device_map=[cpu]"])
    text = str(refused.value)
    assert "1 problem(s)" in text and "literal[" not in text and "dict[" not in text
    assert "source.device_map: Input should be 'auto'; or Input should be a valid dictionary" in (
        text
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["source.kind=batch"], "source.path: required, and not given: a .safetensors, .pt"),
        (["split.micro=4"], "split.convention: required, and not given: the framework's table"),
        (["source.kind=literal"], "source.sequences: required, and not given: the sequences,"),
    ],
)
def test_a_setting_without_a_default_says_what_it_wants(overrides, expected) -> None:
    # pydantic's own words ("Field required") name neither what goes there nor what is allowed
    with pytest.raises(GradlensError) as info:
        build_config(None, overrides)
    assert expected in str(info.value) and "Field required" not in str(info.value)
