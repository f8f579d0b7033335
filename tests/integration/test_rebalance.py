"""Live repartition on real gRPC workers behind the coordinator's real HTTP app: a cluster
started on a skewed split is moved to the advisor's balanced proposal while requests run,
and every request's tokens equal the single-process reference; a worker that refuses its
new range leaves the old split serving, with the reason."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import httpx
import pytest
import yaml

from mlx_relay.cli import main
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator, InferenceRequest
from mlx_relay.coordinator.repartition import RepartitionFailed
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.types import LayerRange
from mlx_relay.model.footprint import read_footprint
from mlx_relay.model.tokenizer import encode_prompt
from mlx_relay.server.placement import PlacementView
from mlx_relay.server.rebalance import RebalanceStatus, split_pairs
from tests.support.cluster import LocalCluster, cluster_dict
from tests.support.dashboard_cluster import wait_for
from tests.support.placement_cluster import run_requests, skewed_cluster_app
from tests.support.reference import cached_tokenizer, reference_tokens

SKEWED = [(0, 3), (3, 4)]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers wide enough that a layer's compute outweighs a forward call's fixed cost."""
    from tests.support.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("wide"), num_layers=4, hidden_size=512)


def expected_ids(model_dir: Path, prompt: str) -> list[int]:
    ids = encode_prompt(cached_tokenizer(model_dir), prompt=prompt, chat=False)
    return [t.token_id for t in reference_tokens(model_dir, ids, MAX_TOKENS)]


async def generate(orchestrator: DistributedOrchestrator, prompt: str) -> list[int]:
    request = InferenceRequest(prompt=prompt, max_tokens=MAX_TOKENS)
    return (await orchestrator.process_request(request)).token_ids


def served(cluster: LocalCluster) -> list[tuple[int, int]]:
    return [(w.layer_range.start, w.layer_range.end) for w in cluster.workers]


async def test_skewed_split_is_rebalanced_live_by_the_cli(
    wide_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        skewed_cluster_app(wide_model_dir, SKEWED) as (cluster, server),
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        orchestrator = cluster.orchestrator
        await run_requests(cluster)

        async def measured() -> PlacementView | None:
            view = PlacementView.model_validate((await http.get("/api/placement")).json())
            return view if view.source == "measured" else None

        view = await wait_for(measured, timeout=15, what="measured stage timings")
        assert view.proposed is not None and view.current is not None
        assert split_pairs(view.current) == SKEWED
        proposed = split_pairs(view.proposed)
        assert proposed[0][1] < 3, proposed  # fewer layers on the overloaded first stage

        prompts = [f"rebalance while running {i}" for i in range(4)]
        running = [asyncio.create_task(generate(orchestrator, p)) for p in prompts]
        await wait_for(lambda: orchestrator.running_requests >= 1, what="requests running")
        path = tmp_path / "cluster.yaml"
        data = cluster_dict(
            wide_model_dir, 2, layers=SKEWED, ports=[w.port for w in cluster.workers]
        )
        data["http"] = {"port": server.port}
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["rebalance", "--config", str(path)])
        out = capsys.readouterr().out
        assert code == 0, out
        outputs = await asyncio.gather(*running)
        for prompt, tokens in zip(prompts, outputs, strict=True):
            assert tokens == expected_ids(wide_model_dir, prompt), prompt

        assert "current: predicted step" in out and "proposed: predicted step" in out
        assert "predicted gain: +" in out
        for phase in ("draining", "loading", "switching", "done"):
            assert f"] {phase}:" in out, out
        text = " / ".join(f"[{a}, {b})" for a, b in proposed)
        assert f"applied {text} in " in out
        assert [(s.layer_range.start, s.layer_range.end) for s in orchestrator.stages] == proposed
        assert served(cluster) == proposed
        status = RebalanceStatus.model_validate((await http.get("/api/placement/apply")).json())
        assert status.state == "done" and status.after == proposed and status.before == SKEWED
        after = "after the rebalance"
        assert await generate(orchestrator, after) == expected_ids(wide_model_dir, after)

        async def moved() -> PlacementView | None:
            view = PlacementView.model_validate((await http.get("/api/placement")).json())
            return view if view.current and split_pairs(view.current) == proposed else None

        await wait_for(moved, timeout=10, what="the advisor's current split to move")
        # Nothing runs now: the same split again changes nothing.
        again = await http.post("/api/placement/apply", json={"split": proposed})
        assert again.status_code == 202
        done = await cluster_status(http, "unchanged")
        assert done.progress[-1].phase == "unchanged"


async def cluster_status(http: httpx.AsyncClient, state: str) -> RebalanceStatus:
    async def ended() -> RebalanceStatus | None:
        status = RebalanceStatus.model_validate((await http.get("/api/placement/apply")).json())
        return status if status.state != "running" else None

    status = await wait_for(ended, timeout=60, what="the repartition to end")
    assert status.state == state, status
    return status


async def test_requests_arriving_during_a_rebalance_wait_then_run(wide_model_dir: Path) -> None:
    async with skewed_cluster_app(wide_model_dir, SKEWED) as (cluster, _server):
        orchestrator = cluster.orchestrator
        early = ["running before", "also running before"]
        late = ["arrives while loading", "arrives too"]
        running = [asyncio.create_task(generate(orchestrator, p)) for p in early]
        arrivals: list[asyncio.Task[list[int]]] = []
        held: dict[str, int] = {}
        await wait_for(lambda: orchestrator.running_requests >= 1, what="requests running")

        def on_phase(phase: str, detail: str) -> None:
            if phase == "loading":
                arrivals.extend(asyncio.create_task(generate(orchestrator, p)) for p in late)
            if phase == "switching":
                assert orchestrator._router is not None
                held["waiting"] = orchestrator._router.only_loop().held_back

        target = [LayerRange(0, 2), LayerRange(2, 4)]
        old = [weakref.ref(w._state.runtime) for w in cluster.workers]
        result = await orchestrator.repartition(target, on_phase)
        assert result.changed and result.after == tuple(target)
        assert held["waiting"] == len(late)  # they waited to join, they did not fail
        outputs = await asyncio.gather(*running, *arrivals)
        for prompt, tokens in zip(early + late, outputs, strict=True):
            assert tokens == expected_ids(wide_model_dir, prompt), prompt
        assert served(cluster) == [(0, 2), (2, 4)]
        assert sum(w.kv_sessions for w in cluster.workers) == 0
        gc.collect()
        assert [ref() for ref in old] == [None, None]  # the old layers' weights are freed


async def test_a_refused_range_rolls_back_to_the_old_split(wide_model_dir: Path) -> None:
    inference = {"max_sessions": 4}
    model = {"max_context": 256, "compute": "float32"}
    costs = read_footprint(wide_model_dir).costs(dense=True, kv_tokens=4 * 256)
    fits, too_big = costs.stage_bytes(LayerRange(3, 4)), costs.stage_bytes(LayerRange(2, 4))
    budget_gb = (fits + too_big) / 2 / 1e9  # [3, 4) fits, [2, 4) does not
    async with (
        skewed_cluster_app(
            wide_model_dir,
            SKEWED,
            inference=inference,
            model=model,
            devices={"worker-1": {"memory_budget_gb": budget_gb}},
        ) as (cluster, server),
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        orchestrator = cluster.orchestrator
        prompt = "running during the refusal"
        running = asyncio.create_task(generate(orchestrator, prompt))
        started = await http.post("/api/placement/apply", json={"split": [[0, 2], [2, 4]]})
        assert started.status_code == 202, started.text
        busy = await http.post("/api/placement/apply", json={"split": [[0, 2], [2, 4]]})
        assert busy.status_code == 409
        status = await cluster_status(http, "failed")
        assert status.error is not None
        assert "worker-1 refused layers [2, 4)" in status.error
        assert "memory_budget_gb" in status.error
        assert "rolled back to [0, 3) / [3, 4)" in status.error
        assert [p.phase for p in status.progress][-1] == "rolling back"
        assert served(cluster) == SKEWED
        assert [(s.layer_range.start, s.layer_range.end) for s in orchestrator.stages] == SKEWED
        assert await running == expected_ids(wide_model_dir, prompt)
        again = "after the rollback"
        assert await generate(orchestrator, again) == expected_ids(wide_model_dir, again)
        with pytest.raises(RepartitionFailed, match="worker-1 refused"):
            await orchestrator.repartition([LayerRange(0, 2), LayerRange(2, 4)])
        bad = await http.post("/api/placement/apply", json={"split": [[0, 2], [3, 4]]})
        assert bad.status_code == 400
        assert "assigned to no stage" in bad.json()["detail"]


async def test_the_automatic_mode_rebalances_a_running_coordinator(wide_model_dir: Path) -> None:
    from mlx_relay.server.app import start_services, stop_services
    from tests.support.cluster import local_cluster
    from tests.support.dashboard_cluster import FAST_MONITORING

    auto = {"enabled": True, "min_gain": 0.01, "hold_down_s": 0, "interval_s": 0.2}
    async with local_cluster(
        wide_model_dir, 2, layers=SKEWED, worker_monitoring=True, initialize=False
    ) as cluster:
        data = cluster.config.to_dict()
        data["monitoring"] = FAST_MONITORING
        data["placement"] = {"auto_rebalance": auto}
        data["alerting"] = {"enabled": False}
        services = await start_services(ClusterConfig.from_dict(data))
        try:
            orchestrator, rebalancer = services.orchestrator, services.rebalancer
            assert orchestrator is not None and rebalancer is not None
            prompt = "the automatic mode"
            for i in range(4):  # every stage measured on the skewed split
                await generate(orchestrator, f"{prompt} {i}")

            def applied() -> RebalanceStatus | None:
                status = rebalancer.status
                return status if status.state == "done" else None

            status = await wait_for(applied, timeout=30, what="the automatic rebalance")
            assert status.trigger == "auto" and status.before == SKEWED
            assert status.after is not None and status.after[0][1] < 3
            assert served(cluster) == status.after
            assert await generate(orchestrator, prompt) == expected_ids(wide_model_dir, prompt)
        finally:
            await stop_services(services)


async def test_requests_still_running_past_the_drain_timeout_leave_the_split_as_it_is(
    wide_model_dir: Path,
) -> None:
    from mlx_relay.core.placement_config import PlacementConfig

    async with skewed_cluster_app(wide_model_dir, SKEWED) as (cluster, _server):
        orchestrator = cluster.orchestrator
        orchestrator.config = orchestrator.config.model_copy(
            update={"placement": PlacementConfig(drain_timeout_s=0.01)}
        )
        prompt = "a long request that outlives the drain"
        ids = encode_prompt(cached_tokenizer(wide_model_dir), prompt=prompt, chat=False)
        long_request = InferenceRequest(prompt=prompt, max_tokens=200)
        running = asyncio.create_task(orchestrator.process_request(long_request))
        await wait_for(lambda: orchestrator.running_requests >= 1, what="the request running")
        with pytest.raises(RepartitionFailed) as failed:
            await orchestrator.repartition([LayerRange(0, 2), LayerRange(2, 4)])
        assert "1 request(s) still running after 0.01 s (placement.drain_timeout_s)" in str(
            failed.value
        )
        assert served(cluster) == SKEWED
        response = await running
        assert response.token_ids == [
            t.token_id for t in reference_tokens(wide_model_dir, ids, 200)
        ]
        after = "after the drain timeout"  # the loop takes new requests again
        assert await generate(orchestrator, after) == expected_ids(wide_model_dir, after)
