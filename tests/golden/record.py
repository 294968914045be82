"""Record the golden reports: ``python tests/golden/record.py [NAME ...]``.

Run it only to accept a deliberate change of the reports; say which fields changed, and
why, in docs/json-schema.md's changelog.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cpu_kernels import pin  # noqa: E402

pin()  # the kernels the tests compute with (tests/cpu_kernels.py)

from cases import cases  # noqa: E402

from gradlens.cli import app  # noqa: E402


def run_case(argv: list[str], setup: list[str] | None, tmp: Path) -> dict:
    runner = CliRunner()
    if setup is not None:
        done = runner.invoke(app, [a.replace("{tmp}", str(tmp)) for a in setup])
        assert done.exit_code == 0, done.output
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp)) for a in argv])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def normalise(report: dict, tmp: str) -> dict:
    """The report with the case's temporary directory written as {tmp}."""
    return json.loads(json.dumps(report).replace(tmp, "{tmp}"))


def main(names: list[str]) -> None:
    for name, argv, _slow, setup in cases():
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            report = normalise(run_case(argv, setup, Path(tmp)), tmp)
        (HERE / f"{name}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print("recorded", name)


if __name__ == "__main__":
    main(sys.argv[1:])
