"""``mlx-relay up`` and ``mlx-relay coordinator`` as real processes: they serve /health, and
SIGINT/SIGTERM leave no child process and no bound port behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.support.cluster import cluster_dict, free_ports, local_cluster

START_TIMEOUT = 120.0


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mlx_relay.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited early:\n{log.read_text()}"
        try:
            response = httpx.get(f"{url}/health", timeout=2.0)
            if response.status_code == 200:
                body: dict = response.json()
                return body
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no healthy /health at {url}:\n{log.read_text()}")


def port_is_free(port: int) -> bool:
    # As a server binds: closed connections still in TIME_WAIT do not hold the port.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening_ports(process: psutil.Process) -> set[int]:
    return {
        c.laddr.port for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
    }


def reap(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` if it still runs (a test's clean-up)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def exit_code_and_output(process: subprocess.Popen[bytes], log: Path) -> tuple[int, str]:
    """Wait for ``process`` to exit by itself (killed past START_TIMEOUT); its code and output."""
    try:
        code = process.wait(timeout=START_TIMEOUT)
    finally:
        reap(process)
    return code, log.read_text()


def stop(process: subprocess.Popen[bytes], sig: int, log: Path) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"did not stop on {sig}:\n{log.read_text()}") from None


def complete(port: int, prompt: str, max_tokens: int) -> httpx.Response:
    """A greedy completion from the app on ``port``, with the model it serves."""
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=60.0,
    )


def test_up_serves_then_stops_everything_on_sigint(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    log = tmp_path / "up.log"
    up = start(["up", "--workers", "2", "--port", str(port), "--model", str(tiny_model_dir)], log)
    try:
        health = wait_healthy(up, f"http://127.0.0.1:{port}", log)
        assert [(s["device_id"], s["layers"]) for s in health["stages"]] == [
            ("worker-0", [0, 2]),
            ("worker-1", [2, 4]),
        ]
        children = psutil.Process(up.pid).children(recursive=True)
        workers = [c for c in children if "worker" in c.cmdline()]
        assert sorted(c.cmdline()[c.cmdline().index("--device-id") + 1] for c in workers) == [
            "worker-0",
            "worker-1",
        ]
        ports = {port} | {p for c in workers for p in listening_ports(c)}
        # The HTTP port, and each worker's gRPC port and direct link.
        assert len(ports) == 5
        # A real request through both workers before Ctrl-C.
        reply = complete(port, "hello", 5)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert stop(up, signal.SIGINT, log) == 0
    finally:
        reap(up)
    output = log.read_text()
    assert f"http://127.0.0.1:{port}/v1" in output
    assert f"http://127.0.0.1:{port}/health" in output
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert all(port_is_free(p) for p in ports), ports


def test_up_gives_up_on_a_worker_that_dies_on_every_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    worker_ports = free_ports(2)
    port = free_ports(1)[0]
    data = cluster_dict(tiny_model_dir, 2, ports=worker_ports)
    data["supervision"] = {"max_restarts": 2, "backoff_initial": 0.2, "backoff_max": 0.5}
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "up.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", worker_ports[1]))  # worker-1 can never bind its port
        taken.listen()
        up = start(["up", "--config", str(config), "--port", str(port)], log)
        code, output = exit_code_and_output(up, log)
    assert code == 1, output
    # Restarted twice with backoff, then given up on, by name.
    assert "worker worker-1 exited with code 2: restart 1 in 0.2 s" in output
    assert "worker worker-1 exited with code 2: restart 2 in 0.4 s" in output
    assert "restart 3" not in output
    assert "worker 'worker-1' exited with code 2, 3 time(s) within 60 s: giving up" in output
    assert "worker worker-0 exited" not in output
    assert port_is_free(worker_ports[0]) and port_is_free(port)
    assert not [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in (p.info["cmdline"] or [])
    ]


def test_up_rejects_bad_arguments(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    up = start(["up", "--workers", "0"], log)
    assert up.wait(timeout=60) == 2
    assert "--workers: expected at least 1, got 0" in log.read_text()


async def test_coordinator_role_serves_workers_started_elsewhere(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with local_cluster(tiny_model_dir, 2, initialize=False) as cluster:
        port = free_ports(1)[0]
        data = cluster_dict(tiny_model_dir, 2, ports=[w.port for w in cluster.workers])
        data["http"] = {"port": port}  # the coordinator's address: one place, `http`
        data["monitoring"] = {"poll_interval": 0.2}  # the poll after the stop comes soon
        config = tmp_path / "cluster.yaml"
        config.write_text(yaml.safe_dump(data))
        log = tmp_path / "coordinator.log"
        coordinator = start(["coordinator", "--config", str(config), "--no-monitoring"], log)
        try:
            health = await asyncio.to_thread(
                wait_healthy, coordinator, f"http://127.0.0.1:{port}", log
            )
            assert [s["status"] for s in health["stages"]] == ["SERVING", "SERVING"]
            await cluster.workers[1].stop(grace=0)
            # /health answers from the coordinator's last poll (every poll_interval).
            deadline = time.monotonic() + 20
            while True:
                response = await asyncio.to_thread(
                    httpx.get, f"http://127.0.0.1:{port}/health", timeout=10.0
                )
                if response.status_code != 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 503
            assert response.json()["failing"] == ["worker-1"]
            code = await asyncio.to_thread(stop, coordinator, signal.SIGTERM, log)
            assert code == 0
        finally:
            reap(coordinator)
        assert port_is_free(port)
