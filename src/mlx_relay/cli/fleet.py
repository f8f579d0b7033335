"""Worker processes of a local cluster (``mlx-relay up``): start, supervise, stop, never orphan.

A worker that exits is started again after a backoff and given up on after repeated exits
in a short window (:class:`~mlx_relay.cli.restart_policy.RestartPolicy`).

Each worker is ``python -m mlx_relay.cli worker`` in its own session, so Ctrl-C reaches only
the parent, which then stops everything in order. On Linux a child also gets SIGTERM if the
parent dies without cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_relay.cli.restart_policy import RestartPolicy
from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import RelayError
from mlx_relay.core.tls_config import tls_material

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: no imports, no locks, one libc call.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_command(
    config_path: Path, device_id: str, *, monitoring: bool, grace: float | None = None
) -> list[str]:
    """The command line that runs ``device_id`` of ``config_path`` as its own process."""
    command = [
        sys.executable,
        "-m",
        "mlx_relay.cli",
        "worker",
        "--config",
        str(config_path),
        "--device-id",
        device_id,
    ]
    if grace is not None:
        command += ["--grace", f"{grace:g}"]
    if not monitoring:
        command.append("--no-monitoring")
    return command


class WorkerExited(RelayError):
    """A worker process kept exiting: the supervisor gave up on it."""

    def __init__(
        self, device_id: str, returncode: int | None, log_tail: str, *, exits: int, window: float
    ) -> None:
        super().__init__(
            f"worker {device_id!r} exited with code {returncode}, {exits} time(s) within "
            f"{window:g} s: giving up on it"
            + (f"; its last output:\n{log_tail}" if log_tail else "")
        )
        self.device_id = device_id
        self.returncode = returncode


@dataclass
class WorkerProcess:
    device_id: str
    address: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    serving: bool = False
    status: str = "starting"
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None
    stage: int = 0
    given_up: bool = False  # exited too often; its stage goes on with its other replicas

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


class WorkerFleet:
    """The worker processes of ``config``, started with ``config_path``.

    Args:
        config: the cluster configuration (workers in pipeline order).
        config_path: the same configuration as a file, for the child processes.
        log_dir: where each worker's output goes (``<device-id>.log``).
        monitoring: run the workers' own monitoring.
        clock: monotonic clock of the restart policy.

    Attributes:
        on_restart: called with a worker's id and its restart count after each restart.
    """

    def __init__(
        self,
        config: ClusterConfig,
        config_path: Path,
        log_dir: Path,
        *,
        monitoring: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.monitoring = monitoring
        self._tls = tls_material(config, config.coordinator_id)
        self.workers = [
            WorkerProcess(w.id, w.address, log_dir / f"{w.id}.log", stage=config.stage_index(w.id))
            for w in config.workers
        ]
        self._policies = {w.device_id: RestartPolicy(config.supervision) for w in self.workers}
        self._clock = clock
        self.on_restart: Callable[[str, int], None] | None = None

    def start(self) -> None:
        """Start every worker process (returns at once; they load in the background)."""
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: WorkerProcess) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = worker_command(self.config_path, worker.device_id, monitoring=self.monitoring)
        with open(worker.log_path, "ab") as log:
            worker.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if _LIBC is not None else None,
            )
        worker.started_at = time.monotonic()
        logger.debug("started %s as pid %d", worker.device_id, worker.process.pid)

    def supervise(self) -> None:
        """Restart workers whose backoff has passed; schedule a restart for each new exit.

        Raises:
            WorkerExited: a worker exited too often within the window: given up on.
        """
        now = self._clock()
        for worker in self.workers:
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    worker.restart_at = None
                    worker.restarts += 1
                    worker.status = "restarting"
                    self._spawn(worker)
                    if self.on_restart is not None:
                        self.on_restart(worker.device_id, worker.restarts)
            elif worker.process is not None and not worker.alive and not worker.given_up:
                self._schedule_restart(worker, now)

    def _schedule_restart(self, worker: WorkerProcess, now: float) -> None:
        policy = self._policies[worker.device_id]
        delay = policy.on_exit(now)
        code = worker.returncode
        worker.serving = False
        if delay is None:
            window = policy.config.window
            exits = policy.recent_exits(now)
            error = WorkerExited(
                worker.device_id, code, worker.log_tail(), exits=exits, window=window
            )
            replicas = [w for w in self.workers if w.stage == worker.stage and w is not worker]
            if not any(not w.given_up for w in replicas):
                raise error
            # Its stage still has replicas: the cluster goes on without this one.
            worker.given_up = True
            worker.status = "given up"
            logger.error("%s; stage %d goes on with its other replicas", error, worker.stage)
            return
        worker.restart_at = now + delay
        worker.status = f"exited ({code}), restarting in {delay:g} s"
        logger.warning(
            "worker %s exited with code %s: restart %d in %g s (output in %s)",
            worker.device_id,
            code,
            worker.restarts + 1,
            delay,
            worker.log_path,
        )

    async def poll_serving(self) -> bool:
        """Supervise, then ask every not-yet-serving worker for its health once; True when
        all serve.

        Raises:
            WorkerExited: a worker exited too often within the window: given up on.
        """
        self.supervise()
        pending = [w for w in self.workers if not w.serving and w.alive]
        await asyncio.gather(*(self._check(w) for w in pending))
        return all(w.serving or w.given_up for w in self.workers)

    async def _check(self, worker: WorkerProcess) -> None:
        client = WorkerClient(worker.device_id, worker.address, self.config.network, tls=self._tls)
        try:
            status = await client.health(timeout=1.0, retry=False)
        except RelayError:
            status = "loading" if worker.alive else "exited"
        finally:
            await client.close()
        worker.status = status.lower().replace("_", " ")
        worker.serving = status == "SERVING"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every live worker, wait up to ``grace`` seconds, SIGKILL the rest."""
        live = [w for w in self.workers if w.alive]
        for worker in live:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
        deadline = time.monotonic() + grace
        for worker in live:
            assert worker.process is not None
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "worker %s did not stop in %.0f s: killing it", worker.device_id, grace
                )
                worker.process.kill()
                worker.process.wait()
