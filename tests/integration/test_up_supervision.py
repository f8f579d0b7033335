"""``mlx-relay up`` restarts a worker process that was killed: the pipeline serves again,
the coordinator keeps running, and the restart is counted in /metrics and /api/devices."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_up_cli import (
    START_TIMEOUT,
    exit_code_and_output,
    port_is_free,
    reap,
    start,
    stop,
    wait_healthy,
)
from tests.support.cluster import cluster_dict, free_ports


def worker_processes(up: psutil.Process) -> dict[str, psutil.Process]:
    found = {}
    for child in up.children(recursive=True):
        command = child.cmdline()
        if "worker" in command and "--device-id" in command:
            found[command[command.index("--device-id") + 1]] = child
    return found


def serving_since(url: str, since: float) -> bool:
    """Every stage SERVING at a poll of the coordinator later than ``since`` (unix s)."""
    response = httpx.get(f"{url}/health", timeout=10.0)
    return response.status_code == 200 and response.json()["checked_at"] > since


def restarts_in_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    return {
        sample.labels["device"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "mlxrelay_worker_restarts"
        for sample in family.samples
        if sample.name == "mlxrelay_worker_restarts_total"
    }


def restarts_in_devices(url: str) -> dict[str, int | None]:
    devices = httpx.get(f"{url}/api/devices", timeout=10.0).json()["devices"]
    return {d["device_id"]: d.get("restarts") for d in devices}


def wait_for(condition: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")


def start_up(
    data: dict[str, Any], tmp_path: Path, port: int, options: list[str] | None = None
) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """``mlx-relay up`` on the configuration ``data``: its file, its log and the process."""
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "up.log"
    command = ["up", "--config", str(config), "--port", str(port), *(options or [])]
    return config, log, start(command, log)


def assert_nothing_left(config: Path, ports: list[int]) -> None:
    """No process of the cluster runs and nothing listens on its ports (a killed worker's
    connections may linger in TIME_WAIT)."""
    assert not [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in (p.info["cmdline"] or [])
    ]
    assert all(port_is_free(p) for p in ports)


def test_up_restarts_a_killed_worker_and_serves_again(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    up = start(["up", "--workers", "2", "--port", str(port), "--model", str(tiny_model_dir)], log)
    try:
        wait_healthy(up, url, log)
        parent = psutil.Process(up.pid)
        before = worker_processes(parent)
        assert sorted(before) == ["worker-0", "worker-1"]
        # The counts join the cluster view right after the HTTP server starts.
        zero = {"worker-0": 0.0, "worker-1": 0.0}
        wait_for(lambda: restarts_in_metrics(url) == zero, "restart counts of 0", log)
        assert restarts_in_devices(url)["worker-1"] == 0
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        request = {"model": model, "prompt": "hello", "max_tokens": 5, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=request, timeout=60.0)
        assert first.status_code == 200, first.text

        before["worker-1"].send_signal(signal.SIGKILL)
        wait_for(lambda: restarts_in_metrics(url).get("worker-1") == 1.0, "a restart", log)
        after = worker_processes(parent)
        assert after["worker-1"].pid != before["worker-1"].pid
        assert after["worker-0"].pid == before["worker-0"].pid
        assert restarts_in_devices(url) == {"coordinator": None, "worker-0": 0, "worker-1": 1}
        restarted_at = time.time()
        # /health answers from the coordinator's last poll: wait for one of the new worker.
        wait_for(lambda: serving_since(url, restarted_at), "the restarted worker serving", log)

        again = httpx.post(f"{url}/v1/completions", json=request, timeout=60.0)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert stop(up, signal.SIGINT, log) == 0
    finally:
        reap(up)
    output = log.read_text()
    assert output.count("worker worker-1 exited with code -9: restart 1 in 1 s") == 1, output
    assert "worker worker-0 exited" not in output
    assert "giving up" not in output


def test_up_gives_up_on_a_worker_killed_again_and_again(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    worker_ports = free_ports(2)
    data = cluster_dict(tiny_model_dir, 2, ports=worker_ports)
    data["supervision"] = {"max_restarts": 1, "backoff_initial": 0.2}
    config, log, up = start_up(data, tmp_path, port)
    try:
        wait_healthy(up, url, log)
        parent = psutil.Process(up.pid)
        worker_processes(parent)["worker-0"].send_signal(signal.SIGKILL)
        wait_for(lambda: restarts_in_devices(url).get("worker-0") == 1, "a restart", log)
        worker_processes(parent)["worker-0"].send_signal(signal.SIGKILL)  # 2 exits > 1
        code, output = exit_code_and_output(up, log)
    finally:
        reap(up)
    assert code == 1, output
    assert "worker 'worker-0' exited with code -9, 2 time(s) within 60 s: giving up" in output
    assert_nothing_left(config, [port, *worker_ports])


def test_up_gives_up_on_a_worker_that_crashes_on_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_ports(1)[0]
    worker_ports = free_ports(2)
    data = cluster_dict(tiny_model_dir, 2, ports=worker_ports, layers=[(0, 2), (2, 4)])
    # worker-1's budget cannot hold its layers: it refuses them and exits on every start.
    data["devices"][2]["memory_budget_gb"] = 0.000001
    data["supervision"] = {"max_restarts": 2, "backoff_initial": 0.2}
    config, log, up = start_up(data, tmp_path, port)
    try:
        code, output = exit_code_and_output(up, log)
    finally:
        reap(up)
    assert code == 1, output
    assert "worker 'worker-1' exited with code 2, 3 time(s) within 60 s: giving up" in output
    assert "memory_budget_gb 1e-06" in output  # the worker's own reason, from its log
    assert "worker worker-0 exited" not in output
    assert_nothing_left(config, [port, *worker_ports])
