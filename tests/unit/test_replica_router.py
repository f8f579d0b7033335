"""Which path through the stages' replicas a request takes, and where a failed replica's
requests go: the router's choices, without any worker (nothing is sent)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mlx_relay.coordinator.pipeline import Stage
from mlx_relay.coordinator.replicas import ReplicaRouter
from mlx_relay.coordinator.scheduler import SchedulerSettings
from mlx_relay.core.errors import PartitionError
from mlx_relay.core.types import LayerRange


@dataclass
class Client:
    """What a step loop reads of a client before it sends anything."""

    device_id: str
    address: str


def router() -> ReplicaRouter:
    ids = [("a", 0), ("a2", 0), ("b", 1), ("b2", 1)]
    stages = [
        Stage(i, d, f"127.0.0.1:{n}", LayerRange(2 * i, 2 * i + 2)) for n, (d, i) in enumerate(ids)
    ]
    clients = [Client(s.device_id, s.address) for s in stages]
    return ReplicaRouter(stages, clients, SchedulerSettings(8, 16), recovery_timeout=5.0)  # type: ignore[arg-type]


def load(loop: object, requests: int) -> None:
    for i in range(requests):
        loop._scheduler.add(f"r{id(loop)}-{i}", 3)  # type: ignore[attr-defined]


def test_requests_go_to_the_least_loaded_replica_of_each_stage() -> None:
    replicas = router()
    first = replicas.place()
    assert first.path == ("a", "b")
    load(first, 2)
    second = replicas.place()
    assert second.path == ("a2", "b2")
    load(second, 1)
    assert replicas.place() is second  # a2 and b2 hold 1 request each, a and b 2
    with pytest.raises(PartitionError, match="replica stages"):
        replicas.only_loop()  # a live repartition moves single stages only


def test_a_failed_replica_sends_its_requests_to_a_live_one_and_comes_back_when_serving() -> None:
    replicas = router()
    loop = replicas.place()
    load(loop, 3)
    target = replicas._failover(loop, "b")
    assert target is not None and target.path == ("a2", "b2")  # a holds the 3 requests
    assert replicas.down == {"b"}
    assert replicas.place().path[1] == "b2"  # b takes no new request while down
    # Both replicas of stage 1 down: nowhere to go, the requests wait for a stage.
    assert replicas._failover(target, "b2") is None
    replicas.update([("a", "SERVING"), ("a2", "SERVING"), ("b", "SERVING"), ("b2", "UNREACHABLE")])
    assert replicas.down == {"b2"}
    assert replicas.place().path[1] == "b"  # b serves again: it takes requests again
