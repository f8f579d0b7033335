"""What the pipeline costs and what it buys: 2-stage loopback pipeline vs one process.

    .venv/bin/python bench/pipeline.py                       # bundled model, 5 rounds, 32 tokens
    .venv/bin/python bench/pipeline.py --rounds 7 --max-tokens 48 --concurrency 1 2 4 8
    .venv/bin/python bench/pipeline.py --micro-batches 2       # a micro-batch per stage
    .venv/bin/python bench/pipeline.py --sections ttft         # one figure only
    .venv/bin/python bench/pipeline.py --sections agreement    # batched vs solo tokens
    .venv/bin/python bench/pipeline.py --sections decode --compare-unary  # stream vs unary
    OPENBLAS_THREAD_TIMEOUT=28 .venv/bin/python bench/pipeline.py --blas-threads 1
        # one BLAS thread per worker and OpenBLAS's own idle spin: the settings before
        # per-step threads, to compare with

On the bundled model (greedy):
  decode     decode tokens/s of one request, single process (``generate_tokens``) vs a
             2-worker pipeline of real ``mlx-relay worker`` processes on loopback, alternating
             rounds; medians, their ratio and the added milliseconds per token. The pipeline's
             tokens must equal the single process's (checked every round). A second
             coordinator over the same workers with the other chained-steps setting
             (inference.chained_steps_max_batch 4 where the default is off, as on a
             CPU-only machine, else 0: each token goes through the coordinator before the
             next step starts) takes its turn in each round. With
             --compare-unary, a pipeline whose Forward calls are unary
             (network.forward_stream off) takes its turn too.
  aggregate  total generated tokens/s with 1, 4, 8 and 16 requests in flight at once (each
             request's prefill included), round by round over the concurrencies in turn
             (medians of --aggregate-rounds, and the ratio of the most in flight to the
             fewest): the requests are batched continuously, one micro-batch per stage
             unless --micro-batches says.
  agreement  16 different greedy chat requests of 32 tokens run at once, then each alone on
             the same pipeline: how many of the 16 token sequences are equal, and for any that
             differ the logit margin (top-1 minus top-2 logprob) where they first part: a
             near-tie that the batch's rounding (1e-6 on float32) may flip.
  ttft       time to first token of a new short request while 15 others decode (each past
             its 8th token), against the same request on an idle pipeline (alternating
             rounds, medians and their ratio; the target is <= 2x): the new request takes
             its prefill and first decode step ahead of the running streams (first-token
             priority). Also the same request sent as the last of the 15 gets its first
             token, while their batch still forms.
"""

from __future__ import annotations

from mlx_relay.core.blas import default_threads, load_blas, set_threads
from mlx_relay.core.hugepages import reexec_with_hugepages

reexec_with_hugepages()  # weights in huge pages, as in the workers
load_blas()  # before MLX is imported below, as in the worker processes

import argparse  # noqa: E402
import asyncio  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from mlx_relay.cli.fleet import WorkerFleet  # noqa: E402
from mlx_relay.cli.up import with_free_worker_ports  # noqa: E402
from mlx_relay.coordinator.connect import CHAINED_STEPS_GPU, chained_steps_max_batch  # noqa: E402
from mlx_relay.coordinator.orchestrator import DistributedOrchestrator, InferenceRequest  # noqa: E402
from mlx_relay.coordinator.scheduler import default_micro_batches  # noqa: E402
from mlx_relay.core.config import ClusterConfig, ModelConfig  # noqa: E402
from mlx_relay.model.generate import generate_tokens  # noqa: E402
from mlx_relay.model.load import load_model, resolve_model_dir  # noqa: E402
from mlx_relay.model.tokenizer import encode_prompt, eos_token_ids, load_tokenizer  # noqa: E402

# A raw completion prompt: short (prefill stays a small part of each request) and it keeps
# the model counting for as many tokens as asked.
PROMPT = "1, 2, 3, 4, 5, 6,"
# Tokens each background request has when the loaded time to first token is measured.
STEADY_TOKENS = 8


def single_process_round(model: Any, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s of one greedy generation in this process, and its tokens."""
    stamps: list[float] = []
    tokens: list[int] = []
    for sampled in generate_tokens(model, prompt, max_tokens):
        stamps.append(time.perf_counter())
        tokens.append(sampled.token_id)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


async def pipeline_round(
    orchestrator: DistributedOrchestrator, max_tokens: int
) -> tuple[float, list[int]]:
    """Decode tokens/s of one greedy request through the pipeline, and its tokens."""
    stamps: list[float] = []
    tokens: list[int] = []
    request = InferenceRequest(prompt=PROMPT, max_tokens=max_tokens)
    async for event in orchestrator.stream_request(request):
        if event.token_id is not None:
            stamps.append(time.perf_counter())
            tokens.append(event.token_id)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


async def aggregate(
    orchestrator: DistributedOrchestrator, concurrent: int, max_tokens: int
) -> float:
    """Generated tokens/s over the wall time of ``concurrent`` simultaneous requests."""
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(
            orchestrator.process_request(InferenceRequest(prompt=PROMPT, max_tokens=max_tokens))
            for _ in range(concurrent)
        )
    )
    elapsed = time.perf_counter() - started
    return sum(r.usage.completion_tokens for r in responses) / elapsed


TOPICS = [
    "the moon",
    "bread",
    "rivers",
    "chess",
    "volcanoes",
    "bees",
    "trains",
    "glass",
    "winter",
    "maps",
    "coffee",
    "whales",
    "bridges",
    "music",
    "deserts",
    "clocks",
]


def chat(topic: str) -> InferenceRequest:
    return InferenceRequest(
        messages=[{"role": "user", "content": f"Write two sentences about {topic}."}],
        max_tokens=32,
        top_logprobs=2,
        logprobs=True,
    )


async def agreement_section(orchestrator: DistributedOrchestrator) -> None:
    print("\n== agreement: 16 greedy chat requests at once vs each alone ==")
    together = await asyncio.gather(*(orchestrator.process_request(chat(t)) for t in TOPICS))
    equal = 0
    for topic, batched in zip(TOPICS, together, strict=True):
        alone = await orchestrator.process_request(chat(topic))
        if batched.token_ids == alone.token_ids:
            equal += 1
            continue
        at = next(
            (
                i
                for i, (a, b) in enumerate(zip(alone.token_ids, batched.token_ids, strict=False))
                if a != b
            ),
            min(len(alone.token_ids), len(batched.token_ids)),
        )
        margins = []
        for run in (alone, batched):
            if run.logprobs is not None and at < len(run.logprobs):
                top = sorted((lp for _, lp in run.logprobs[at].top_logprobs), reverse=True)
                margins.append(f"{top[0] - top[1]:.2e}" if len(top) > 1 else "n/a")
        print(
            f"  {topic!r}: first differs at token {at}; top-1 minus top-2 logprob there "
            f"(alone, batched): {', '.join(margins)}"
        )
    print(f"{equal} of {len(TOPICS)} token sequences equal to their solo run")


async def time_to_first_token(orchestrator: DistributedOrchestrator) -> float:
    """Seconds from sending a new short request to its first token."""
    started = time.perf_counter()
    first: float | None = None
    async for event in orchestrator.stream_request(InferenceRequest(prompt=PROMPT, max_tokens=1)):
        if event.token_id is not None and first is None:
            first = time.perf_counter() - started
    assert first is not None, "the request produced no token"
    return first


async def loaded_time_to_first_token(
    orchestrator: DistributedOrchestrator, background: int, max_tokens: int, steady_tokens: int
) -> tuple[float, float, int]:
    """TTFT of a new short request while ``background`` requests decode: sent as the last of
    them gets its first token (their batch is still forming), and again once each has
    ``steady_tokens`` (steady decoding); also how many were still decoding at the second."""
    counts = [0] * background
    started, steady = asyncio.Event(), asyncio.Event()

    async def decode(row: int) -> None:
        request = InferenceRequest(prompt=PROMPT, max_tokens=max_tokens)
        async for event in orchestrator.stream_request(request):
            if event.token_id is not None:
                counts[row] += 1
                if min(counts) >= 1:
                    started.set()
                if min(counts) >= steady_tokens:
                    steady.set()

    tasks = [asyncio.create_task(decode(row)) for row in range(background)]
    try:
        await asyncio.wait_for(started.wait(), timeout=120)
        at_start = await time_to_first_token(orchestrator)
        await asyncio.wait_for(steady.wait(), timeout=120)
        in_steady = await time_to_first_token(orchestrator)
        still = sum(not t.done() for t in tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return at_start, in_steady, still


async def aggregate_section(
    args: argparse.Namespace, orchestrator: DistributedOrchestrator
) -> None:
    """Each round runs every concurrency once, in turn (reversed every other round), so that
    the machine's drift over the section weighs on all of them alike."""
    print("\n== aggregate (requests in flight at once, prefill included) ==")
    rates: dict[int, list[float]] = {c: [] for c in args.concurrency}
    for round_ in range(args.aggregate_rounds):
        order = args.concurrency if round_ % 2 == 0 else list(reversed(args.concurrency))
        for concurrent in order:
            rates[concurrent].append(await aggregate(orchestrator, concurrent, args.max_tokens))
    for concurrent in args.concurrency:
        print(f"{concurrent:2d} concurrent: {spread(rates[concurrent])} tok/s")
    low, high = min(args.concurrency), max(args.concurrency)
    if low != high:
        ratio = statistics.median(rates[high]) / statistics.median(rates[low])
        print(f"ratio {high} / {low} in flight {ratio:.2f}x (medians)")


def local_config(
    model_dir: Path,
    workers: int,
    micro_batches: int | None,
    blas_threads: int | None = None,
    forward_stream: bool = True,
) -> ClusterConfig:
    devices: list[dict[str, Any]] = [
        {"id": f"worker-{i}", "host": "127.0.0.1", "port": 0, "layers": "auto"}
        for i in range(workers)
    ]
    data = {
        "model": {"path": str(model_dir), "blas_threads": blas_threads},
        "devices": devices,
        "inference": {"micro_batches": micro_batches},
        "network": {"forward_stream": forward_stream},
    }
    return with_free_worker_ports(ClusterConfig.from_dict(data), avoid=0)


def chaining(orchestrator: DistributedOrchestrator) -> str:
    return "steps chained" if chained_steps_max_batch(orchestrator.config) else "not chained"


def spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.2f}  (min {min(values):.2f}, max {max(values):.2f})"
    )


async def main(args: argparse.Namespace) -> None:
    model_dir = resolve_model_dir(ModelConfig(), progress=True)
    tokenizer = load_tokenizer(model_dir)
    prompt = encode_prompt(tokenizer, prompt=PROMPT, chat=False)
    eos = eos_token_ids(tokenizer)
    config = local_config(model_dir, 2, args.micro_batches, args.blas_threads)
    work_dir = Path(tempfile.mkdtemp(prefix="mlx-relay-bench-"))
    config_path = work_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    fleet = WorkerFleet(config, config_path, work_dir, monitoring=args.monitoring)
    fleet.start()
    unary_fleet: WorkerFleet | None = None
    if args.compare_unary and "decode" in args.sections:
        # Its workers start now, before this process has gRPC threads to fork beside.
        unary_fleet = unary_workers(args, model_dir, work_dir)
    orchestrator = DistributedOrchestrator(config, enable_monitoring=args.monitoring)
    unary: tuple[WorkerFleet, DistributedOrchestrator] | None = None
    try:
        while not await fleet.poll_serving():
            await asyncio.sleep(0.2)
        await orchestrator.initialize()
        if unary_fleet is not None:
            unary = (unary_fleet, await serving_orchestrator(unary_fleet, args))
        set_threads(default_threads(1))
        # The same weights the workers pick (model.compute: auto), so the tokens must match.
        model = load_model(model_dir, compute="auto")
        hosts = [stage[0].host for stage in config.stages]
        print(f"model {model_dir.name}: prompt {len(prompt)} tokens, {args.max_tokens} new tokens")
        print(
            f"pipeline: {', '.join(f'{s.device_id} {s.layer_range}' for s in orchestrator.stages)}"
        )
        print(
            f"monitoring {'on' if args.monitoring else 'off'}; {args.rounds} alternating rounds; "
            f"micro-batches in flight: {args.micro_batches or default_micro_batches(hosts)}\n"
        )

        await pipeline_round(orchestrator, 4)  # warm-up: channels, caches, code paths
        single_process_round(model, prompt, 4)
        if unary is not None:
            await pipeline_round(unary[1], 4)
        if "decode" in args.sections:
            other = await serving_orchestrator(
                fleet, args, config.model_copy(update={"inference": other_chain(config)})
            )
            try:
                await pipeline_round(other, 4)
                await decode_section(
                    args, orchestrator, model, prompt, eos, other, unary[1] if unary else None
                )
            finally:
                await other.shutdown()
        if unary is not None:  # idle from here on: the other sections run without it
            await unary[1].shutdown()
            unary[0].stop()
            unary = None
        if "aggregate" in args.sections:
            await aggregate_section(args, orchestrator)
        if "ttft" in args.sections:
            await ttft_section(args, orchestrator)
        if "agreement" in args.sections:
            await agreement_section(orchestrator)
    finally:
        await orchestrator.shutdown()
        fleet.stop()
        if unary is not None:
            await unary[1].shutdown()
            unary[0].stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def unary_workers(args: argparse.Namespace, model_dir: Path, work_dir: Path) -> WorkerFleet:
    """The workers of a second pipeline, the same but with unary Forward calls
    (network.forward_stream off), for the decode section to alternate with."""
    config = local_config(model_dir, 2, args.micro_batches, args.blas_threads, False)
    unary_dir = work_dir / "unary"
    unary_dir.mkdir()
    config_path = unary_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    fleet = WorkerFleet(config, config_path, unary_dir, monitoring=args.monitoring)
    fleet.start()
    return fleet


def other_chain(config: ClusterConfig) -> Any:
    """``config``'s inference section with chained steps on (4) where they are off by
    default, else off."""
    default = chained_steps_max_batch(config)
    return config.inference.model_copy(
        update={"chained_steps_max_batch": 0 if default else CHAINED_STEPS_GPU}
    )


async def serving_orchestrator(
    fleet: WorkerFleet, args: argparse.Namespace, config: ClusterConfig | None = None
) -> DistributedOrchestrator:
    """A coordinator over ``fleet`` (``config``: its own, else the fleet's) once its
    workers serve."""
    orchestrator = DistributedOrchestrator(
        config or fleet.config, enable_monitoring=args.monitoring
    )
    while not await fleet.poll_serving():
        await asyncio.sleep(0.2)
    await orchestrator.initialize()
    return orchestrator


async def ttft_section(args: argparse.Namespace, orchestrator: DistributedOrchestrator) -> None:
    background = args.ttft_background
    print(f"\n== time to first token: idle vs {background} requests decoding ==")
    idle: list[float] = []
    starting: list[float] = []
    loaded: list[float] = []
    for i in range(args.rounds):
        # Idle: the last round's cancelled requests and their last step are gone.
        await orchestrator.wait_idle()
        idle.append(await time_to_first_token(orchestrator))
        at_start, in_steady, still = await loaded_time_to_first_token(
            orchestrator, background, 256, STEADY_TOKENS
        )
        starting.append(at_start)
        loaded.append(in_steady)
        print(
            f"round {i + 1}: idle {1000 * idle[-1]:7.1f} ms   loaded {1000 * loaded[-1]:7.1f} ms"
            f"   ({still} of {background} still decoding)   as they start "
            f"{1000 * starting[-1]:7.1f} ms"
        )
    i_med, l_med = statistics.median(idle), statistics.median(loaded)
    s_med = statistics.median(starting)
    print(f"idle   median {1000 * i_med:7.1f} ms")
    print(f"loaded median {1000 * l_med:7.1f} ms (the {background} past token {STEADY_TOKENS})")
    print(f"ratio loaded/idle {l_med / i_med:.2f} (target <= 2)")
    print(
        f"as they start: median {1000 * s_med:7.1f} ms, {s_med / i_med:.2f}x idle (sent as the"
        " last of them gets its first token: it waits for the step that gathers their batch)"
    )


async def decode_section(
    args: argparse.Namespace,
    orchestrator: DistributedOrchestrator,
    model: Any,
    prompt: list[int],
    eos: Any,
    other: DistributedOrchestrator,
    unary: DistributedOrchestrator | None = None,
) -> None:
    single: list[float] = []
    pipe: list[float] = []
    other_pipe: list[float] = []
    unary_pipe: list[float] = []
    for i in range(args.rounds):
        rate, expected = single_process_round(model, prompt, args.max_tokens)
        single.append(rate)
        rate, got = await pipeline_round(orchestrator, args.max_tokens)
        pipe.append(rate)
        if expected and expected[-1] in eos:
            expected = expected[:-1]
        assert got == expected, f"round {i}: pipeline tokens differ from single process"
        line = f"round {i + 1}: single {single[-1]:6.2f} tok/s   pipeline {pipe[-1]:6.2f} tok/s"
        rate, got = await pipeline_round(other, args.max_tokens)
        other_pipe.append(rate)
        assert got == expected, f"round {i}: {chaining(other)} pipeline tokens differ"
        line += f"   {chaining(other)} {other_pipe[-1]:6.2f} tok/s"
        if unary is not None:
            rate, got = await pipeline_round(unary, args.max_tokens)
            unary_pipe.append(rate)
            assert got == expected, f"round {i}: unary pipeline tokens differ"
            line += f"   unary calls {unary_pipe[-1]:6.2f} tok/s"
        print(line)

    s, p = statistics.median(single), statistics.median(pipe)
    print("\n== decode (one request, greedy) ==")
    print(f"single process   {spread(single)} tok/s")
    print(f"2-stage pipeline {spread(pipe)} tok/s")
    print(f"ratio pipeline/single {p / s:.3f}; added {1000 * (1 / p - 1 / s):.1f} ms per token")
    print(f"  (the default: {chaining(orchestrator)})")
    o = statistics.median(other_pipe)
    print(f"{chaining(other)} {spread(other_pipe)} tok/s")
    added = 1000 * (1 / o - 1 / s)
    print(f"ratio {chaining(other)}/single {o / s:.3f}; added {added:.1f} ms per token")
    chained, unchained = (o, p) if chained_steps_max_batch(other.config) else (p, o)
    print(f"chaining saves {1000 * (1 / unchained - 1 / chained):.2f} ms per token")
    if unary_pipe:
        u = statistics.median(unary_pipe)
        print(f"the same with unary Forward calls {spread(unary_pipe)} tok/s")
        print(
            f"ratio unary/single {u / s:.3f}; added {1000 * (1 / u - 1 / s):.1f} ms per token; "
            f"the stream saves {1000 * (1 / u - 1 / p):.2f} ms per token"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--aggregate-rounds",
        type=int,
        default=3,
        help="aggregate section: rounds over the concurrencies, alternating order",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="inference.micro_batches (default: one per machine the stages run on)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="model.blas_threads of each worker (default: the cores divided among them)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["decode", "aggregate", "ttft", "agreement"],
        default=["decode", "aggregate", "ttft", "agreement"],
    )
    parser.add_argument(
        "--ttft-background", type=int, default=15, help="requests decoding during the ttft figure"
    )
    parser.add_argument(
        "--monitoring", action="store_true", help="run with monitoring on (default: off)"
    )
    parser.add_argument(
        "--compare-unary",
        action="store_true",
        help="decode section: also a pipeline with unary Forward calls, alternating",
    )
    asyncio.run(main(parser.parse_args()))
