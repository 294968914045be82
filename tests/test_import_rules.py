"""The import rules (scripts/check_imports.py) hold for gradlens, and the checker can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts/check_imports.py")
assert spec is not None and spec.loader is not None
check_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_imports)


def test_gradlens_follows_the_import_rules() -> None:
    assert check_imports.check(ROOT / "gradlens") == []


def write(root: Path, files: dict[str, str]) -> Path:
    package = root / "gradlens"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_the_checker_finds_cycles_upward_and_function_level_imports(tmp_path: Path) -> None:
    package = write(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "from gradlens.config import X\n",  # base → config: upward
            "config.py": "import gradlens.errors\nX = 1\n",  # and back: a cycle
            "grads.py": "def f():\n    from gradlens.errors import E\n",  # function-level
            "cli/__init__.py": "def main():\n    from gradlens.grads import f\n",  # allowed
            "stray.py": "",  # in no layer
        },
    )
    problems = check_imports.check(package)
    assert any("errors (base) imports gradlens.config, a layer above" in p for p in problems)
    assert any(p.startswith("import cycle:") and "gradlens.config" in p for p in problems)
    assert any("grads.py:2: function-level import of gradlens.errors" in p for p in problems)
    assert not any("cli" in p for p in problems)
    assert any("gradlens.stray is in no layer" in p for p in problems)
