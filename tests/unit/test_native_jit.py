"""MLX's compiled CPU kernels build with this machine's instructions and the same bits."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mlx_relay.core import native_jit

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("g++") is None,
    reason="the wrapper is for Linux's g++ (make run and make test install it)",
)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A process in which prepare() has not run and no wrapper is on PATH; PATH, TMPDIR and
    Python's temporary directory come back afterwards."""
    monkeypatch.setattr(native_jit, "_prepared", False)
    monkeypatch.setattr(native_jit, "_active", None)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    # As in a process started without one: the test process has its own wrapper.
    monkeypatch.setenv("PATH", os.pathsep.join(native_jit.without_wrappers(os.environ["PATH"])))
    monkeypatch.setenv("TMPDIR", tempfile.gettempdir())
    monkeypatch.delenv(native_jit.ENV, raising=False)
    return tmp_path


def macros(*command: str) -> str:
    """The preprocessor's predefined macros under ``command``."""
    run = subprocess.run(
        [*command, "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True
    )
    run.check_returncode()
    return "\n".join(sorted(run.stdout.splitlines()))


def real_compiler() -> str:
    """The first g++ on PATH that is not a wrapper (the test process has one of its own)."""
    for entry in os.environ["PATH"].split(os.pathsep):
        candidate = Path(entry or ".") / "g++"
        if candidate.is_file() and native_jit.MARK not in candidate.read_text(errors="replace"):
            return os.path.realpath(candidate)
    raise AssertionError("no g++ on PATH")


def test_the_wrapper_comes_first_on_path_and_python_keeps_its_temporary_directory(
    fresh: Path,
) -> None:
    real = real_compiler()
    python_tmp = tempfile.gettempdir()
    jit = native_jit.prepare(fresh)
    assert jit is not None and native_jit.active() == jit
    assert jit.bin_dir.is_relative_to(fresh / "jit") and jit.kernel_dir.is_dir()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(jit.bin_dir)
    wrapper = shutil.which("g++")
    assert wrapper == str(jit.bin_dir / "g++")
    # It compiles as the real compiler does with the flags: this machine's instructions.
    assert macros(wrapper) == macros(real, *native_jit.FLAGS)
    native = set(macros(real, "-march=native").splitlines())
    assert native <= set(macros(wrapper).splitlines()) and native != set(macros(real).splitlines())
    assert "-ffp-contract=off" in Path(wrapper).read_text()
    assert os.environ["TMPDIR"] == str(jit.kernel_dir)
    assert tempfile.gettempdir() == python_tmp
    assert native_jit.prepare(fresh) is jit  # once per process
    # A child process replaces the inherited wrapper with its own, for the same compiler.
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**os.environ, "MLX_RELAY_CACHE": str(fresh / "c")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    child_path, child_real = child.stdout.split()
    assert child_real == real
    entries = child_path.split(os.pathsep)
    assert entries[0].startswith(str(fresh / "c" / "jit")) and str(jit.bin_dir) not in entries


CHILD = """
import os
from mlx_relay.core import native_jit
jit = native_jit.prepare()
words = open(jit.bin_dir / "g++").read().split()
print(os.environ["PATH"], words[words.index("exec") + 1])
"""


def test_turned_off_it_changes_nothing(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native_jit.ENV, "0")
    path = os.environ["PATH"]
    assert native_jit.prepare(fresh) is None
    assert os.environ["PATH"] == path and not (fresh / "jit").exists()


def test_a_compiler_refusing_the_flags_is_one_warning(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old = fresh / "old-gcc"
    old.mkdir()
    refusing = old / "g++"
    refusing.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && '
        "{ echo \"g++: error: unrecognized command-line option '-march=native'\" >&2; exit 1; }; "
        "done\nexit 0\n"
    )
    refusing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{old}{os.pathsep}{os.environ['PATH']}")
    path, tmpdir = os.environ["PATH"], os.environ["TMPDIR"]
    with caplog.at_level(logging.WARNING, logger="mlx_relay.core.native_jit"):
        assert native_jit.prepare(fresh / "cache") is None
    assert len(caplog.records) == 1
    assert "unrecognized command-line option" in caplog.records[0].getMessage()
    assert os.environ["PATH"] == path and os.environ["TMPDIR"] == tmpdir


# Compiled graphs of the kinds a decode step fuses: SiLU gating, an exp, a norm's rsqrt.
KERNELS = r"""
import hashlib, json, os, sys
from pathlib import Path
from mlx_relay.core.blas import load_blas
load_blas()
import mlx.core as mx
from mlx_relay.core import native_jit
mx.random.seed(7)
gate, up = mx.random.normal((16, 1536)) * 4, mx.random.normal((16, 1536))
# Special values in the vectorized loops: infinities, NaN, past exp's range, denormals.
special = mx.array([float("inf"), float("-inf"), float("nan"), 89.0, -89.0, 88.7, -87.9,
                    1e-40, -0.0, 0.0] * 160)
gate = mx.concatenate([gate, (special * 1.0).reshape(1, 1600)[:, :1536]], axis=0)
up = mx.concatenate([up, mx.ones((1, 1536))], axis=0)
graphs = [
    mx.compile(lambda g, u: g * mx.sigmoid(g) * u),
    mx.compile(lambda g, u: mx.exp(g - 3.0) / (1.0 + mx.exp(u))),
    mx.compile(lambda g, u: g * mx.rsqrt(mx.mean(g * g, axis=-1, keepdims=True) + 1e-5) * u),
    mx.compile(lambda g, u: mx.sigmoid(g) + mx.exp(-g) * u),
]
digest = hashlib.sha256()
for graph in graphs:
    out = graph(gate, up)
    mx.eval(out)
    digest.update(memoryview(out))
jit = native_jit.active()
built = len(list(jit.kernel_dir.glob("mlx/*/cpu/*.so"))) if jit else 0
print(json.dumps({"bits": digest.hexdigest(), "built": built}))
"""


def run_kernels(env: dict[str, str]) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout.splitlines()[-1]))


def test_kernels_built_for_this_machine_compute_the_same_bits(tmp_path: Path) -> None:
    env = {**os.environ, "MLX_RELAY_CACHE": str(tmp_path / "cache")}
    plain_tmp = tmp_path / "plain"
    plain_tmp.mkdir()
    plain = run_kernels({**env, native_jit.ENV: "0", "TMPDIR": str(plain_tmp)})
    native = run_kernels(env)
    assert plain["built"] == 0 and list(plain_tmp.glob("mlx/*/cpu/*.so"))
    assert native["built"] == 4  # every graph went through the wrapper
    assert native["bits"] == plain["bits"]
