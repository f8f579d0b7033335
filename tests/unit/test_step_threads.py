"""BLAS threads per step: a stage alone on its host's cores takes all of them, stages that
may compute at once share them, and idle BLAS threads stop spinning soon after a step."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator

import mlx.core as mx
import pytest

from mlx_relay.core.blas import (
    BLAS_PACKAGE,
    THREAD_TIMEOUT_ENV,
    THREAD_TIMEOUT_EXPONENT,
    BlasLibrary,
    load_blas,
    loaded_blas,
    set_threads,
)
from mlx_relay.core.config import ClusterConfig
from mlx_relay.worker.stage_loader import blas_threads, thread_policy
from mlx_relay.worker.step_threads import StepThreads, ThreadPolicy


@pytest.fixture
def openblas() -> Iterator[BlasLibrary]:
    library = load_blas()
    if library.path is None:
        pytest.skip(f"no OpenBLAS on this machine (Debian package {BLAS_PACKAGE})")
    yield library
    set_threads(max(1, library.threads))


@pytest.mark.parametrize(
    ("cores", "here", "fixed", "in_flight", "threads"),
    [
        (2, 2, None, 1, 2),  # one micro-batch: the stages of the host compute in turn
        (2, 2, None, 2, 1),  # a micro-batch per stage: both may compute at once
        (2, 2, None, 5, 1),  # never fewer cores per stage than the host's stages share
        (2, 2, None, 0, 1),  # unknown: the cores divided among the host's workers
        (16, 3, None, 2, 8),  # 2 of the host's 3 stages busy at most
        (16, 1, None, 4, 16),  # the only stage here: all cores whatever is in flight
        (2, 2, 3, 1, 3),  # model.blas_threads: every step
        (1, 2, None, 1, 1),
    ],
)
def test_threads_per_step(
    cores: int, here: int, fixed: int | None, in_flight: int, threads: int
) -> None:
    assert ThreadPolicy(cores, here, fixed).for_step(in_flight) == threads


def test_a_worker_policy_counts_the_workers_on_its_host() -> None:
    config = ClusterConfig.from_dict(
        {
            "model": {"path": "/models/x"},
            "devices": [
                {"id": "w0", "host": "127.0.0.1", "port": 50051},
                {"id": "w1", "host": "localhost", "port": 50052},
                {"id": "w2", "host": "10.0.0.2", "port": 50051},
            ],
        }
    )
    policy = thread_policy(config, config.device("w0"))
    assert (policy.workers_here, policy.fixed) == (2, None)
    assert policy.cores == len(os.sched_getaffinity(0))
    assert blas_threads(config, config.device("w0")) == policy.for_step(0)
    assert thread_policy(config, config.device("w2")).workers_here == 1


def test_step_threads_set_the_process_blas_threads_when_they_change(openblas: BlasLibrary) -> None:
    threads = StepThreads(ThreadPolicy(cores=2, workers_here=2))
    assert threads.apply(1) == 2
    library = loaded_blas()
    assert library is not None and library.threads == 2
    assert threads.apply(2) == 1
    library = loaded_blas()
    assert library is not None and library.threads == 1
    set_threads(2)  # another worker of this process changed them: set again
    assert threads.apply(2) == 1
    library = loaded_blas()
    assert library is not None and library.threads == 1


def test_idle_blas_threads_stop_spinning_soon_after_the_last_matmul(openblas: BlasLibrary) -> None:
    """OpenBLAS's own default keeps an idle thread spinning for 2^28 cycles (about 0.1 s),
    burning a core another stage of the host could compute on."""
    assert os.environ.get(THREAD_TIMEOUT_ENV) == str(THREAD_TIMEOUT_EXPONENT)
    set_threads(2)
    weights = mx.random.normal((1024, 1024))
    # Behind the router: one row to OpenBLAS's sgemv, 64 rows to its sgemm, and 4 rows times
    # the transposed weights (a decode step) to the router's kernel and its threads.
    rows = [mx.random.normal((1, 1024)), mx.random.normal((64, 1024))]
    steps = mx.random.normal((4, 1024))
    mx.eval(weights, steps, *rows)

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    burnt = []
    for _ in range(5):
        for _ in range(20):
            mx.eval([x @ weights for x in rows] + [steps @ weights.T])
        before = cpu_seconds()
        time.sleep(0.2)
        burnt.append(cpu_seconds() - before)
    # Spinning through the pause would burn tens of milliseconds of CPU time.
    assert min(burnt) < 0.005, burnt


def test_helpers_are_sent_to_sleep_after_a_step_only_where_workers_share_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlx_relay.worker.step_threads as step_threads

    rests: list[int] = []
    monkeypatch.setattr(step_threads, "rest_threads", lambda: rests.append(1))
    StepThreads(ThreadPolicy(cores=2, workers_here=1)).rest()
    assert rests == [], "alone on its host: helpers keep spinning for the next step"
    StepThreads(ThreadPolicy(cores=2, workers_here=2)).rest()
    StepThreads(ThreadPolicy(cores=4, workers_here=3, fixed=1)).rest()
    assert rests == [1, 1]
