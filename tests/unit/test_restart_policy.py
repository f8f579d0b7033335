"""The restart policy of ``mlx-relay up`` on a fake clock: backoff and giving up."""

from __future__ import annotations

import pytest

from mlx_relay.cli.restart_policy import RestartPolicy
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.core.supervision_config import SupervisionConfig

WORKER = {"id": "w", "role": "worker", "port": 50051}


def test_backoff_doubles_from_one_second_up_to_thirty() -> None:
    policy = RestartPolicy(SupervisionConfig(max_restarts=10, window=1000.0))
    now, delays = 0.0, []
    for _ in range(8):
        delay = policy.on_exit(now)
        assert delay is not None
        delays.append(delay)
        now += delay + 0.5  # the restarted worker lives half a second
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_gives_up_after_more_than_max_restarts_within_the_window() -> None:
    policy = RestartPolicy(SupervisionConfig(max_restarts=3, window=60.0))
    assert [policy.on_exit(t) for t in (0.0, 5.0, 10.0)] == [1.0, 2.0, 4.0]
    assert policy.on_exit(20.0) is None


def test_exits_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(SupervisionConfig(max_restarts=2, window=60.0))
    assert policy.on_exit(0.0) == 1.0
    assert policy.on_exit(30.0) == 2.0
    assert policy.recent_exits(89.0) == 1  # the exit at 0 s is out of the window
    assert policy.on_exit(89.0) == 2.0
    assert policy.on_exit(200.0) == 1.0  # a long healthy run starts the backoff over


def test_max_restarts_zero_never_restarts() -> None:
    assert RestartPolicy(SupervisionConfig(max_restarts=0)).on_exit(0.0) is None


def test_defaults_and_the_supervision_section() -> None:
    default = ClusterConfig.from_dict({"devices": [WORKER]}, "c.yaml")
    assert default.supervision == SupervisionConfig(
        max_restarts=5, window=60.0, backoff_initial=1.0, backoff_max=30.0
    )
    with pytest.raises(ConfigError, match=r"c\.yaml.*supervision\.backoff_max"):
        ClusterConfig.from_dict(
            {
                "devices": [WORKER],
                "supervision": {"backoff_initial": 5, "backoff_max": 2},
            },
            "c.yaml",
        )
