"""The placement advisor on a live 2-worker cluster started with a skewed split: after some
requests, /api/placement and /metrics propose a more balanced split with a predicted gain."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
import yaml

from mlx_relay.cli import main
from mlx_relay.server.placement import PlacementView
from tests.support.cluster import cluster_dict
from tests.support.dashboard_cluster import wait_for
from tests.support.placement_cluster import run_requests, skewed_cluster_app

STEP = re.compile(r'^mlxrelay_placement_predicted_step_seconds\{split="(\w+)"\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers wide enough that a layer's compute outweighs a forward call's fixed cost."""
    from tests.support.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("wide"), num_layers=4, hidden_size=512)


async def test_skewed_split_gets_a_balanced_proposal(
    wide_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        skewed_cluster_app(wide_model_dir) as (cluster, server),
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        before = PlacementView.model_validate((await http.get("/api/placement")).json())
        assert before.source == "model"
        await run_requests(cluster)

        async def measured() -> PlacementView | None:
            view = PlacementView.model_validate((await http.get("/api/placement")).json())
            return view if view.source == "measured" else None

        view = await wait_for(measured, timeout=15, what="measured stage timings")
        assert view.current is not None and view.proposed is not None
        current = [(s.layer_start, s.layer_end) for s in view.current.stages]
        proposed = [(s.layer_start, s.layer_end) for s in view.proposed.stages]
        assert current == [(0, 3), (3, 4)]
        assert proposed[0][1] < 3, proposed  # fewer layers on the overloaded first stage
        assert view.predicted_gain_ratio is not None and view.predicted_gain_ratio > 0
        assert view.proposed.predicted_step_seconds < view.current.predicted_step_seconds
        # The step is the slowest stage; one request's latency adds every stage and link.
        for split in (view.current, view.proposed):
            slowest = max(s.predicted_seconds for s in split.stages)
            assert split.predicted_step_seconds >= slowest
            assert split.predicted_latency_seconds >= sum(s.predicted_seconds for s in split.stages)
        text = (await http.get("/metrics")).text
        steps = {name: float(value) for name, value in STEP.findall(text)}
        assert set(steps) == {"current", "proposed"}
        assert steps["proposed"] < steps["current"]

        what_if = await http.get("/api/placement", params={"without": "worker-1"})
        alone = PlacementView.model_validate(what_if.json())
        assert alone.proposed is not None
        assert [(s.device_id, s.layer_start, s.layer_end) for s in alone.proposed.stages] == [
            ("worker-0", 0, 4)
        ]
        # The command asks the running coordinator named by the config's http address.
        data = cluster_dict(
            wide_model_dir,
            2,
            layers=[(0, 3), (3, 4)],
            ports=[w.port for w in cluster.workers],
            http={"port": server.port},
        )
        config_path = tmp_path / "cluster.yaml"
        config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["placement", "--config", str(config_path)])
        assert code == 0
        out = capsys.readouterr().out
        assert out.startswith("placement from live stage timings")
        assert "worker-0     layers [0, 3)" in out.split("proposed:")[0]
        assert "predicted gain: +" in out
        unknown = await http.get("/api/placement", params={"without": "worker-9"})
        assert unknown.status_code == 400
        assert "no device worker-9" in unknown.json()["detail"]
        # A what-if device's memory must be positive and finite in bytes: 422, never a 500.
        for gb in ("-1", "0", "1e300"):
            bad = await http.get("/api/placement", params={"add_device_gb": gb})
            assert bad.status_code == 422, (gb, bad.text)
        everyone = await http.get("/api/placement", params={"without": ["worker-0", "worker-1"]})
        assert everyone.status_code == 400
        # The served schema says which workers `without` takes, and never all of them.
        schema = (await http.get("/openapi.json")).json()
        (without,) = [
            p
            for p in schema["paths"]["/api/placement"]["get"]["parameters"]
            if p["name"] == "without"
        ]
        assert without["schema"]["items"]["enum"] == ["worker-0", "worker-1"]
        assert len(without["schema"]["not"]["allOf"]) == 2
