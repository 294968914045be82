"""The framework registry: prefixes, version checks and the errors a new user meets first.

These run without any framework installed (a fake `Framework` stands in); the real frameworks'
losses are tested in tests/losses/test_frameworks.py where they are installed.
"""

from __future__ import annotations

import pytest
import torch

from gradlens.errors import GradlensError
from gradlens.losses.frameworks import FRAMEWORKS, framework_of, framework_rows
from gradlens.losses.frameworks.base import Framework, parse_version, require, split_kl


def fake(distribution: str, supported: tuple = ((0, 1), (0, 2))) -> Framework:
    def resolve(name: str, rest: str):
        raise AssertionError("not resolved in these tests")

    return Framework(
        "fake", distribution, supported, "0.1.5", "pip install fake==0.1.5", (), resolve
    )


def test_prefixes_name_their_framework() -> None:
    assert set(FRAMEWORKS) == {"verl", "trl", "openrlhf"}
    framework = framework_of("verl:vanilla")
    assert framework is not None and framework.distribution == "verl"
    assert framework_of("trl:grpo+kl") is FRAMEWORKS["trl"]
    assert framework_of("mypkg.losses:fn") is None  # a user loss
    assert framework_of("ppo_clip") is None


def test_a_missing_framework_says_how_to_install_it() -> None:
    with pytest.raises(GradlensError) as info:
        require(fake("gradlens-surely-not-installed-xyz"), "fake:loss")
    message = str(info.value)
    assert "gradlens-surely-not-installed-xyz is not installed" in message
    assert "pip install fake==0.1.5" in message


def test_an_unsupported_version_names_the_supported_range() -> None:
    # torch is installed, at 2.x: outside [0.1, 0.2)
    with pytest.raises(GradlensError) as info:
        require(fake("torch"), "fake:loss")
    message = str(info.value)
    assert f"torch {torch.__version__} is installed" in message
    assert "torch >= 0.1, < 0.2 (tested: 0.1.5)" in message
    assert require(fake("torch", ((2, 0), (99, 0))), "fake:loss") == torch.__version__


def test_versions_and_suffixes_parse() -> None:
    assert parse_version("0.9.1") == (0, 9, 1)
    assert parse_version("1.16.0.dev0") == (1, 16, 0)
    assert parse_version("0.10.0rc1") == (0, 10, 0)
    assert split_kl("grpo+kl") == ("grpo", True) and split_kl("grpo") == ("grpo", False)


def test_the_losses_command_lists_every_framework_with_versions() -> None:
    rows = {row["framework"]: row for row in framework_rows()}
    assert rows["verl"]["supported"] == "verl >= 0.7, < 0.10" and rows["verl"]["tested"] == "0.9.1"
    assert rows["trl"]["supported"] == "trl >= 1.10, < 1.17"
    assert rows["openrlhf"]["supported"] == "openrlhf >= 0.11, < 0.12"
    assert "verl:vanilla" in rows["verl"]["names"] and "trl:gspo" in rows["trl"]["names"]
