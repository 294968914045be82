"""The first minutes with the command: --version, -h everywhere, and "the post" named and linked."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import gradlens
from gradlens.cli import app
from gradlens.report.cells import SEED_POST
from gradlens.report.table import render_compare
from gradlens.results import CompareReport
from tests.compare.test_golden_reports import upgrade  # the recorded reports in today's schema

REPO = Path(__file__).resolve().parents[2]

COMMANDS = ["compare", "sweep", "dump", "losses", "config", "schema"]
POST = re.compile(r"\bpost\b", re.IGNORECASE)
runner = CliRunner()


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str):
    result = runner.invoke(app, [flag])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"gradlens {gradlens.__version__}"


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_dash_h_is_help_on_every_command(command: list[str]):
    short = runner.invoke(app, [*command, "-h"])
    long = runner.invoke(app, [*command, "--help"])
    assert short.exit_code == 0, short.output
    assert "Usage:" in short.stdout and short.stdout == long.stdout


def test_the_seed_post_has_its_section():
    # docs/losses.md#the-seed-post: the anchor GitHub makes of the heading "The seed post"
    page, anchor = SEED_POST.split("#")
    headings = re.findall(r"^#+ (.+)$", (REPO / page).read_text(), re.MULTILINE)
    assert anchor in {
        re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings
    }


def _outputs() -> dict[str, str]:
    """Every help text and table that may speak of the post."""
    out = {f"{c} --help": runner.invoke(app, [c, "--help"]).stdout for c in COMMANDS}
    out["--help"] = runner.invoke(app, ["--help"]).stdout
    out["losses"] = runner.invoke(app, ["losses"]).stdout
    out["compare"] = runner.invoke(app, ["compare"]).stdout
    data = upgrade(json.loads((REPO / "tests/golden/model_builtin.json").read_text()))
    data["schema_version"] = CompareReport.model_fields["schema_version"].default
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    render_compare(CompareReport.model_validate(data), console)
    out["compare --source model"] = console.export_text()
    return out


@pytest.mark.slow
def test_every_mention_of_the_post_names_and_links_it():
    outputs = _outputs()
    mentions = {name for name, text in outputs.items() if POST.search(text)}
    # the compare help, its table, the model tables and the loss list all quote the post
    assert {"compare --help", "compare", "compare --source model", "losses"} <= mentions
    for name in sorted(mentions):
        text = " ".join(outputs[name].split())
        assert SEED_POST in text, f"{name}: mentions the post without {SEED_POST}"
        assert "the post" not in re.sub("the seed post", "", text), f"{name}: 'the post' unnamed"
