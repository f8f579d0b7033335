"""BLAS threads per ``Forward``: a stage that computes alone on its host uses all its cores.

With ``model.blas_threads`` unset, a worker's BLAS gets the host's cores divided among the
stages of that host that compute at the same moment. That is at most the workers configured
on the host, and at most the micro-batches the coordinator has in the pipeline, which it
sends with every ``Forward`` (``microbatches_in_flight``): one request on two stages of one
host runs each stage on every core in turn, a full pipeline one core per stage. Without the
figure (0: an older coordinator, a direct call) the cores are divided among the host's
workers, as at load.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_relay.core.blas import default_threads, loaded_blas, rest_threads, set_threads


@dataclass(frozen=True)
class ThreadPolicy:
    """How many BLAS threads a step of this worker uses.

    Attributes:
        cores: the cores of this worker's host it may run on.
        workers_here: workers configured on this host (this one included).
        fixed: ``model.blas_threads``: every step uses this many.
    """

    cores: int
    workers_here: int
    fixed: int | None = None

    @property
    def most(self) -> int:
        """The threads of a step that computes alone."""
        return self.for_step(1)

    def for_step(self, in_flight: int) -> int:
        """The threads of a step sent while ``in_flight`` micro-batches are in the pipeline
        (0: unknown)."""
        if self.fixed is not None:
            return self.fixed
        here = max(1, self.workers_here)
        computing = here if in_flight <= 0 else min(in_flight, here)
        return default_threads(computing, self.cores)


class StepThreads:
    """Sets the process's BLAS thread count before each step, when it differs (MLX thread
    only: the count is process-wide and only that thread computes)."""

    def __init__(self, policy: ThreadPolicy) -> None:
        self.policy = policy

    def apply(self, in_flight: int) -> int:
        """Set the threads for a step sent with ``in_flight`` micro-batches in the pipeline;
        returns them."""
        threads = self.policy.for_step(in_flight)
        library = loaded_blas()
        if library is None or library.threads != threads:
            set_threads(threads)
        return threads

    def rest(self) -> None:
        """The step is over: where other workers share this host, BLAS helper threads still
        waiting for work sleep now (the cores go to the stage computing next); a worker alone
        on its host keeps them spinning for its next step."""
        if self.policy.workers_here > 1:
            rest_threads()
