"""A multi-host test topology on one Linux machine: network namespaces joined by a bridge.

Each "host" is a network namespace with its own address on a private /24 that the topology
creates (a veth pair per host, the outer ends enslaved to one bridge); the bridge itself holds
the first address and stands for the coordinator's machine, so code running in the test
process reaches the hosts over real IP, exactly as it would reach other machines. Processes
run inside a host with ``ip netns exec``. Only the topology's own addresses are ever used, and
everything (processes, namespaces, bridge) is removed on exit, also when the test fails.

    reason = netns_unavailable_reason()
    if reason: pytest.skip(reason)
    with topology(2) as net:
        proc = net.hosts[0].popen([sys.executable, "-m", "mlx_relay.cli", "worker", ...])

Names carry the test process's pid, so concurrent test runs do not collide, and namespaces
left behind by a run that was killed outright are removed by the next one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "mlxrelay-t"
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)$")
# Candidate test subnets 10.213.N.0/24; one not routed on this machine is picked.
_SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")


class TopologyError(RuntimeError):
    """An ``ip`` command failed while building the topology."""


def _ip_command() -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("ip", path=search)


IP = _ip_command() or "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


@contextlib.contextmanager
def topology_or_skip(num_hosts: int) -> Iterator[Topology]:
    """:func:`topology`, or skip the test with :func:`netns_unavailable_reason`'s reason."""
    import pytest

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with topology(num_hosts) as net:
        yield net


def netns_unavailable_reason() -> str | None:
    """None when this machine can build a topology, else exactly why it cannot."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if _ip_command() is None:
        return "the `ip` command (iproute2) is not installed: run `make system-packages`"
    pid = os.getpid()
    veth = ["link", "add", f"mrv{pid}pa", "type", "veth", "peer", "name", f"mrv{pid}pb"]
    steps = [
        ("create a network namespace", ["netns", "add", f"{PREFIX}{pid}-probe"]),
        ("create a bridge", ["link", "add", f"mrb{pid}p", "type", "bridge"]),
        ("create a veth pair", veth),
    ]
    try:
        for what, args in steps:
            result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                return f"cannot {what} (needs root): {result.stderr.strip()}"
    finally:
        for args in (["netns", "del", f"{PREFIX}{pid}-probe"], ["link", "del", f"mrb{pid}p"],
                     ["link", "del", f"mrv{pid}pa"]):  # fmt: skip
            subprocess.run([IP, *args], capture_output=True, timeout=30)
    return None


@dataclass
class Host:
    """One namespace: a machine of its own with ``address`` on the topology's subnet."""

    namespace: str
    address: str
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return [IP, "netns", "exec", self.namespace, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is stopped when the topology closes.

        ``ip netns exec`` execs the program in place, so the process's pid is the program's.
        """
        process = subprocess.Popen(self.command(argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=30)


@dataclass
class Topology:
    """The bridge (``gateway`` address, in the test's own namespace) and the hosts."""

    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: str
    hosts: list[Host]


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(word, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def _free_subnet(tag: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    subnets = list(_SUBNET_BASE.subnets(new_prefix=24))
    for i in range(len(subnets)):
        candidate = subnets[(tag + i) % len(subnets)]
        if not any(candidate.overlaps(n) for n in used if n.prefixlen > 0):
            return candidate
    raise TopologyError(f"no free /24 in {_SUBNET_BASE}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces and bridges of earlier runs whose test process no longer exists."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for name in (line.split()[0] for line in listed if line.strip()):
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines()
    for line in links:
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            bridge = re.match(r"^mrb(\d+)$", name)
            if bridge and not _pid_alive(int(bridge.group(1))):
                _ip("link", "del", name, check=False)


def _kill_namespace_processes(namespace: str) -> None:
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _stop(process: subprocess.Popen[Any], grace: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def topology(num_hosts: int, *, grace: float = 5.0) -> Iterator[Topology]:
    """Build ``num_hosts`` namespaces on a fresh bridge; tear everything down on exit.

    Raises:
        TopologyError: an ``ip`` command failed (the message names it and its error).
    """
    remove_stale()
    pid = os.getpid()
    subnet = _free_subnet(pid)
    addresses = list(subnet.hosts())
    bridge = f"mrb{pid}"
    gateway = str(addresses[0])
    hosts = [Host(f"{PREFIX}{pid}-{i}", str(addresses[i + 1])) for i in range(num_hosts)]
    net = Topology(bridge, subnet, gateway, hosts)
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, host in enumerate(hosts):
            outer, inner = f"mrv{pid}h{i}", f"mrv{pid}n{i}"
            _ip("netns", "add", host.namespace)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", host.namespace)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            inside = ("netns", "exec", host.namespace, IP)
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "link", "set", inner, "name", "eth0")
            _ip(*inside, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
        _wait_reachable(net)
        yield net
    finally:
        for host in hosts:
            for process in host.processes:
                _stop(process, grace)
            _kill_namespace_processes(host.namespace)
            _ip("netns", "del", host.namespace, check=False)
        _ip("link", "del", bridge, check=False)


def _wait_reachable(net: Topology, timeout: float = 10.0) -> None:
    # A fresh bridge port may take a moment before it forwards: connect from each host to a
    # listener on the bridge address until it answers.
    probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)"
    with socket.create_server((net.gateway, 0)) as listener:
        port = str(listener.getsockname()[1])
        deadline = time.monotonic() + timeout
        for host in net.hosts:
            while True:
                result = host.run([sys.executable, "-c", probe, net.gateway, port])
                if result.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise TopologyError(
                        f"{host.namespace} ({host.address}) cannot reach {net.gateway}: "
                        f"{result.stderr.strip().splitlines()[-1:]}"
                    )
                time.sleep(0.1)
