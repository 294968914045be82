"""Every `gradlens` command in docs/trace.md and docs/integrations.md runs as written.

The commands run from a scratch directory in which ``docs`` is the repository's docs folder,
so that files they write (``--plot``) land there and not in the repository.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradlens.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/trace.md", "docs/integrations.md")


def commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        in_bash = False
        for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
                continue
            if in_bash and line.startswith("gradlens "):
                found.append((doc, line))
    return found


def test_the_docs_have_commands() -> None:
    docs = {doc for doc, _ in commands()}
    assert docs == set(DOCS)


@pytest.mark.slow
@pytest.mark.parametrize(("doc", "line"), commands())
def test_doc_command_runs(
    doc: str, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, shlex.split(line)[1:])
    assert result.exit_code == 0, f"{doc}: {line}\n{result.output}"
    if "trace docs/examples/trl_run" in line and "--format" not in line:
        assert "SPIKE" in result.output
    if "--plot" in line:
        assert (tmp_path / "trl_run.png").stat().st_size > 10_000
