"""docs/architecture.md stays true: every file and every ``mlx_relay.`` name it mentions
exists, so renaming or removing one without updating the page fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"

# Inline code spans; within them, repository paths and dotted names under mlx_relay.
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE = re.compile(r"^(?:src|tests|docs|config|bench|scripts|examples)/[\w/.-]+$|^[\w.-]+\.toml$")
NAME = re.compile(r"^mlx_relay(?:\.\w+)+$")


def mentioned() -> tuple[list[str], list[str]]:
    spans = CODE_SPAN.findall(PAGE.read_text(encoding="utf-8"))
    files = sorted({s for s in spans if FILE.match(s)})
    names = sorted({s for s in spans if NAME.match(s)})
    return files, names


def resolve(dotted: str) -> object:
    """The object a dotted name refers to: the longest importable module prefix, then
    attributes (``pkg.module.Class.method``)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_the_page_names_enough_to_follow_a_request() -> None:
    files, names = mentioned()
    assert len(files) >= 30 and len(names) >= 40, (len(files), len(names))


def test_every_file_the_page_names_exists() -> None:
    files, _ = mentioned()
    missing = [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_name_the_page_mentions_exists() -> None:
    _, names = mentioned()
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def test_a_stale_name_is_caught() -> None:
    # The check itself must be able to fail.
    with pytest.raises(AttributeError):
        resolve("mlx_relay.coordinator.pipeline.RequestRun._generate")
    with pytest.raises((ImportError, AttributeError)):
        resolve("mlx_relay.server.openai_api.chat_completions")
