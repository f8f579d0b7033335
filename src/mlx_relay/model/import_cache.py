"""Imported GGUF models on disk: written atomically, recorded with their source, reused.

Each import goes to a temporary directory beside its destination and is renamed into
place, so readers never see half a model. A marker file records the source file's size and
mtime, and a fingerprint of its content, so that a changed GGUF is imported again while
the same file at another path (another checkout or virtual environment sharing the cache) is
not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_relay.core.errors import ModelError, ModelNotFound
from mlx_relay.model.gguf import convert_gguf

logger = logging.getLogger(__name__)

# Written last into an imported directory; bump the version when the import output changes.
IMPORT_MARKER = "mlx_relay_import.json"
IMPORT_VERSION = 1
# The fingerprint hashes this many bytes at the start, middle and end of the file.
_SAMPLE_BYTES = 1 << 20


def cached_import(gguf: Path, out_dir: Path, progress: bool, name: str) -> Path:
    """``out_dir`` holding ``gguf`` imported, importing it only if it is missing or stale."""
    marker = out_dir / IMPORT_MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        if _same_source(recorded.get("source"), gguf):
            return out_dir
        logger.info("%s changed since it was imported; importing it again", gguf)
    # A fresh import never replaces a directory another process may be loading from.
    return import_into(gguf, out_dir, progress, replace=out_dir.exists(), name=name)


def _same_source(recorded: Any, gguf: Path) -> bool:
    if not isinstance(recorded, dict) or recorded.get("version") != IMPORT_VERSION:
        return False
    stamp = _file_stamp(gguf)
    if all(recorded.get(key) == value for key, value in stamp.items()):
        return True
    # Another path or mtime: the same file if its size and sampled content match.
    return recorded.get("size") == stamp["size"] and recorded.get("fingerprint") == (
        _fingerprint(gguf)
    )


def _file_stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"path": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _fingerprint(gguf: Path) -> str:
    """SHA-256 over the size and three samples of the file (start, middle, end): a few
    milliseconds for a model of any size."""
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as fh:
        for offset in sorted(
            {0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}
        ):
            fh.seek(offset)
            digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _source_stamp(gguf: Path) -> dict[str, Any]:
    return {**_file_stamp(gguf), "fingerprint": _fingerprint(gguf), "version": IMPORT_VERSION}


def import_into(gguf: Path, out_dir: Path, progress: bool, replace: bool, name: str | None) -> Path:
    """Import ``gguf`` into ``out_dir`` atomically (see ``load.import_gguf``).

    Args:
        replace: Replace an earlier import in ``out_dir``; without it, an import another
            process finished first is kept.
        name: The model name recorded for ``read_model_info``.
    """
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF file not found: {gguf}")
    if out_dir.exists() and not _replaceable(out_dir):
        raise ModelError(
            f"{out_dir} exists and is not a model imported by mlx-relay; "
            "remove it or choose another output directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        with _progress(f"Importing {gguf.name}", enabled=progress) as step:
            convert_gguf(gguf, tmp, step=step)
            marker = {"name": name or gguf.stem, "source": _source_stamp(gguf)}
            (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
            step("done")
        _move_into_place(tmp, out_dir, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("imported %s into %s", gguf, out_dir)
    return out_dir


def _replaceable(out_dir: Path) -> bool:
    # Only an earlier import (or an empty directory) is ever replaced, never a user's files.
    return out_dir.is_dir() and ((out_dir / IMPORT_MARKER).is_file() or not any(out_dir.iterdir()))


def _move_into_place(tmp: Path, out_dir: Path, replace: bool) -> None:
    old: Path | None = None
    if out_dir.exists() and replace:
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        # Another process finished the same import first: keep theirs.
        if not (out_dir / IMPORT_MARKER).is_file():
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _progress(title: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda _msg: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stages = ("reading GGUF", "converting weights", "building tokenizer", "writing weights")
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(title, total=len(stages) + 1, stage="")
        seen = 0

        def step(message: str) -> None:
            nonlocal seen
            bar.update(task, completed=seen, stage=message)
            seen += 1

        yield step
        bar.update(task, completed=len(stages) + 1)


def recorded_name(model_dir: Path) -> str | None:
    """The model name an import recorded in ``model_dir``, if any."""
    try:
        name = json.loads((model_dir / IMPORT_MARKER).read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None
