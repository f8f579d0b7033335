"""One pipeline stage: its shard, its KV sessions, and the checks every Forward entry passes.

:meth:`StageRuntime.check` is pure and runs on the event loop, so a malformed message is
rejected before it waits behind other requests on the MLX thread. :meth:`StageRuntime.load`
and :meth:`StageRuntime.forward` run on the MLX thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_relay import wire
from mlx_relay.core.errors import InvalidRequest
from mlx_relay.core.types import LayerRange
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.worker.sessions import KVSession, KVSessionStore, Step
from mlx_relay.worker.stage_types import (
    CheckedEntry,
    EngineInfo,
    ForwardOutcome,
    StageCall,
    StageLimits,
)

__all__ = [
    "CheckedEntry",
    "EngineInfo",
    "ForwardOutcome",
    "StageCall",
    "StageLimits",
    "StageRuntime",
]

logger = logging.getLogger(__name__)


@dataclass
class _Rows:
    """The entries of one batched call: ``results[slots[k]]`` receives entry ``k``'s."""

    entries: list[CheckedEntry]
    sessions: list[KVSession]
    slots: list[int]
    results: list[pb.ForwardResult | None]

    @classmethod
    def of(
        cls,
        entries: Sequence[CheckedEntry],
        sessions: Sequence[KVSession],
        slots: list[int],
        results: list[pb.ForwardResult | None],
    ) -> _Rows:
        return cls([entries[i] for i in slots], [sessions[i] for i in slots], slots, results)


class StageRuntime:
    """A loaded shard plus its KV sessions.

    Args:
        shard: the stage's layers (``mlx_relay.model.shard.Shard``).
        limits: the stage's request limits.
    """

    def __init__(self, shard: Any, limits: StageLimits, engine: EngineInfo | None = None) -> None:
        self.shard = shard
        self.limits = limits
        self.engine = engine or EngineInfo(compute=str(getattr(shard, "compute", "unknown")))
        self.is_first: bool = shard.is_first
        self.is_last: bool = shard.is_last
        self.hidden_size: int = shard.hidden_size
        self.vocab_size: int = shard.vocab_size
        self.dtype: str = _wire_dtype(shard.dtype)
        self.sessions = KVSessionStore(
            shard.make_cache,
            max_sessions=limits.max_sessions,
            max_per_peer=limits.max_sessions_per_peer,
            ttl_seconds=limits.session_ttl_seconds,
            max_length=limits.max_context,
        )
        from mlx_relay.model.batch import BatchGroups

        self.batches = BatchGroups()
        # Seconds of the current Forward spent encoding outputs and sampling (MLX thread).
        self._encoding = 0.0
        self._sampling = 0.0

    @classmethod
    def load(
        cls,
        model_dir: Path,
        layer_range: LayerRange,
        limits: StageLimits,
        compute: str = "quantized",
        dense_memory_share: float = 0.5,
    ) -> StageRuntime:
        """Load only ``layer_range`` of the model in ``model_dir`` with ``compute`` weights
        (MLX thread)."""
        from mlx_relay.core.blas import loaded_blas
        from mlx_relay.model.backend import backend_name, blas_in_use
        from mlx_relay.model.shard import Shard

        started = time.perf_counter()
        shard = Shard.load(model_dir, layer_range, compute, dense_memory_share)
        shard.warm_up()
        library = loaded_blas()
        engine = EngineInfo(
            backend=backend_name(),
            compute=shard.compute,
            blas=blas_in_use(library),
            blas_threads=library.threads if library is not None else 0,
        )
        runtime = cls(shard, limits, engine)
        logger.info(
            "loaded layers %s of %s in %.2fs (first=%s last=%s dtype=%s backend=%s "
            "compute=%s blas=%s threads=%d)",
            layer_range,
            model_dir,
            time.perf_counter() - started,
            runtime.is_first,
            runtime.is_last,
            runtime.dtype,
            engine.backend,
            engine.compute,
            engine.blas,
            engine.blas_threads,
        )
        return runtime

    @property
    def input_dtype(self) -> str:
        return "int32" if self.is_first else self.dtype

    def check(self, request: pb.ForwardRequest) -> list[CheckedEntry]:
        """Check every entry's request id, tensor and length without touching MLX.

        Raises:
            InvalidRequest: the first problem found, naming the entry's request id.
        """
        if not request.entries:
            raise InvalidRequest("a Forward request needs at least one entry")
        checked = []
        for entry in request.entries:
            rid = entry.request_id
            if not rid:
                raise InvalidRequest("request_id must not be empty")
            if entry.position < 0:
                raise InvalidRequest(f"request {rid!r}: position must be >= 0")
            if not entry.HasField("tensor"):
                raise InvalidRequest(f"request {rid!r}: the entry carries no tensor")
            shape: tuple[int | None, ...] = (
                (1, None) if self.is_first else (1, None, self.hidden_size)
            )
            what = f"request {rid!r}: " + ("token ids" if self.is_first else "hidden states")
            got = wire.check_tensor(entry.tensor, dtype=self.input_dtype, shape=shape, what=what)
            length = got[1]
            if length > self.limits.max_prompt_tokens:
                raise InvalidRequest(
                    f"request {rid!r}: {length} positions in one step exceed "
                    f"max_prompt_tokens = {self.limits.max_prompt_tokens}"
                )
            if self.is_first:
                ids = wire.to_numpy(entry.tensor)
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high >= self.vocab_size:
                    bad = low if low < 0 else high
                    raise InvalidRequest(
                        f"request {rid!r}: token id {bad} is outside the vocabulary "
                        f"[0, {self.vocab_size})"
                    )
            sampling = None
            if self.is_last:
                try:
                    sampling = wire.decode_sampling(entry.sampling)
                except InvalidRequest as exc:
                    raise InvalidRequest(f"request {rid!r}: {exc}", param=exc.param) from None
            checked.append(CheckedEntry(entry, length, sampling))
        return checked

    def forward(self, entries: Sequence[CheckedEntry], peer: str = "") -> ForwardOutcome:
        """Run checked entries through the shard (MLX thread).

        The first prompt chunks of several new requests run together in one call, left-padded
        to the longest; other multi-position entries (later chunks) run alone; all
        one-position entries (decode steps) run together in one batched call, whatever their
        requests' cached lengths. A lone decode step of a request that is in no batch runs on
        its own caches (the compiled single-request step). Results come back in the entries'
        order. New sessions count against ``peer``'s quota (the caller's identity).

        Raises:
            SessionNotFound, PositionMismatch, ContextOverflow, SessionLimitReached: the
                entries do not fit the sessions; nothing was computed.
            PeerQuotaReached: ``peer`` would hold more than its share of sessions.
        """
        started = time.perf_counter()
        self._encoding = self._sampling = 0.0
        sessions = self.sessions.open(
            [Step(c.entry.request_id, int(c.entry.position), c.length) for c in entries],
            peer=peer,
        )
        # Rows of requests that ended (EndSession, expiry) leave their batch groups here at
        # the latest, on the MLX thread.
        self.release_ended()
        results: list[pb.ForwardResult | None] = [None] * len(entries)
        calls: list[StageCall] = []
        try:
            decode = [i for i, c in enumerate(entries) if c.length == 1]
            if len(decode) == 1 and sessions[decode[0]].request_id not in self.batches:
                decode = []
            new = [c.length > 1 and c.entry.position == 0 for c in entries]
            fresh = [
                i for i, s in enumerate(sessions) if new[i] and s.request_id not in self.batches
            ]
            if len(fresh) > 1:
                call_started = time.perf_counter()
                self._prefill(_Rows.of(entries, sessions, fresh, results))
                seconds = time.perf_counter() - call_started
                tokens = sum(entries[i].length for i in fresh)
                calls.append(StageCall("prefill", seconds, tokens, len(fresh)))
            else:
                fresh = []
            batched = set(decode) | set(fresh)
            for i, (checked, session) in enumerate(zip(entries, sessions, strict=True)):
                if i in batched:
                    continue
                call_started = time.perf_counter()
                if session.request_id in self.batches:
                    session.cache = self.batches.take(session.request_id)
                output = self.shard(
                    wire.decode(checked.entry.tensor),
                    session.cache,
                    last_position_only=self.is_last,
                )
                _evaluate(output)  # so that encode or sample below times only itself
                results[i] = self._result(checked, session, output)
                seconds = time.perf_counter() - call_started
                phase = "prefill" if checked.length > 1 else "decode"
                calls.append(StageCall(phase, seconds, checked.length, 1))
            if decode:
                call_started = time.perf_counter()
                self._decode(_Rows.of(entries, sessions, decode, results))
                seconds = time.perf_counter() - call_started
                calls.append(StageCall("decode", seconds, len(decode), len(decode)))
        except Exception:
            # A failed step may leave a cache half-written: these sessions cannot continue.
            for session in sessions:
                self.sessions.end(session.request_id)
            self.release_ended()
            raise
        done = [r for r in results if r is not None]
        assert len(done) == len(entries)
        return ForwardOutcome(
            done,
            time.perf_counter() - started,
            calls,
            started=started,
            encode_seconds=self._encoding,
            sample_seconds=self._sampling,
        )

    def release_ended(self) -> list[str]:
        """Free the batch rows of requests whose sessions ended (MLX thread)."""
        return self.batches.retain(set(self.sessions.request_ids()))

    def _decode(self, rows: _Rows) -> None:
        """One batched call for one-position entries."""
        import mlx.core as mx

        entries, sessions = rows.entries, rows.sessions
        own = {s.request_id: s.cache for s in sessions if s.request_id not in self.batches}
        group = self.batches.assemble([s.request_id for s in sessions], own)
        for session in sessions:
            if session.request_id in own:
                session.cache = []  # its positions now live in the batch group
        index = {s.request_id: k for k, s in enumerate(sessions)}
        order = [index[rid] for rid in group.rows]
        x = mx.concatenate([wire.decode(entries[k].entry.tensor) for k in order], axis=0)
        output = self._run_group(x, group)
        self._batch_results(rows, output, order, [0] * len(order))

    def _prefill(self, rows: _Rows) -> None:
        """One batched call for the first prompt chunks of several new requests, left-padded
        to the longest; their rows then form a new batch group."""
        import mlx.core as mx

        from mlx_relay.model.batch import empty_batch_caches

        entries, sessions = rows.entries, rows.sessions
        longest = max(c.length for c in entries)
        pads = [longest - c.length for c in entries]
        parts = []
        for checked, pad in zip(entries, pads, strict=True):
            part = wire.decode(checked.entry.tensor)
            widths = [(0, 0), (pad, 0)] + ([] if self.is_first else [(0, 0)])
            parts.append(mx.pad(part, widths) if pad else part)
        caches = empty_batch_caches(self.shard, pads)
        group = self.batches.adopt([s.request_id for s in sessions], caches)
        for session in sessions:
            session.cache = []  # its positions live in the batch group
        output = self._run_group(mx.concatenate(parts, axis=0), group)
        order = list(range(len(entries)))
        self._batch_results(rows, output, order, pads)

    def _run_group(self, x: Any, group: Any) -> Any:
        """The shard's evaluated output for a batch group's rows; a failed step discards the
        group (its caches may be half-written)."""
        import mlx.core as mx

        try:
            output = self.shard(x, group.caches, last_position_only=self.is_last)
            if not self.is_last:
                output = output.astype(self.shard.dtype)
            mx.eval(output)
        except Exception:
            self.batches.discard(group)
            raise
        return output

    def _batch_results(
        self, rows: _Rows, output: Any, order: Sequence[int], pads: Sequence[int]
    ) -> None:
        """Each row's result: row ``r`` of ``output`` is entry ``order[r]``, after
        ``pads[order[r]]`` positions of left padding."""
        import mlx.core as mx

        entries, sessions = rows.entries, rows.sessions
        ready: dict[int, Any] = {}  # rows' tokens or tensors, computed for all at once
        if self.is_last:
            # Greedy rows are picked in one evaluation; sampled ones one by one (own seeds).
            from mlx_relay.model.sampling import greedy_rows

            wanted = [row for row, k in enumerate(order) if _is_greedy(entries[k].sampling)]
            if wanted:
                sampling_started = time.perf_counter()
                every = len(wanted) == len(order)
                picked = greedy_rows(output[:, -1] if every else output[mx.array(wanted), -1])
                ready = dict(zip(wanted, picked, strict=True))
                self._sampling += time.perf_counter() - sampling_started
        else:
            # Every row's hidden states from one read of the (evaluated) output.
            encoding_started = time.perf_counter()
            starts = [(row, pads[k]) for row, k in enumerate(order)]
            ready = dict(enumerate(wire.encode_rows(output, starts)))
            self._encoding += time.perf_counter() - encoding_started
        for row, k in enumerate(order):
            rows.results[rows.slots[k]] = self._result(
                entries[k], sessions[k], output[row : row + 1], ready.get(row)
            )

    def _result(
        self, checked: CheckedEntry, session: KVSession, output: Any, ready: Any = None
    ) -> pb.ForwardResult:
        """One entry's result from its ``(1, L, ...)`` output, or from ``ready`` (its token
        already sampled on the last stage, its tensor already encoded on the others);
        advances its session."""
        from mlx_relay.model.sampling import sample

        entry = checked.entry
        result = pb.ForwardResult(request_id=entry.request_id)
        part_started = time.perf_counter()
        token = tensor = ready
        if self.is_last:
            if token is None:
                token = sample(output[0, -1], checked.sampling, int(entry.step))
                self._sampling += time.perf_counter() - part_started
            result.token_id = int(token.token_id)
            result.logprob = float(token.logprob)
            result.top_logprobs.extend(
                pb.TopLogprob(token_id=int(t), logprob=float(lp)) for t, lp in token.top_logprobs
            )
        elif tensor is not None:
            result.tensor.CopyFrom(tensor)
        else:
            # encode evaluates the hidden state and its wire view at once.
            result.tensor.CopyFrom(wire.encode(output.astype(self.shard.dtype)))
            self._encoding += time.perf_counter() - part_started
        result.cached_tokens = self.sessions.advance(session, checked.length)
        return result


def _evaluate(output: Any) -> None:
    import mlx.core as mx

    mx.eval(output)


def _is_greedy(params: Any) -> bool:
    return bool(params.temperature == 0 and params.top_logprobs == 0)


def _wire_dtype(dtype: Any) -> str:
    if isinstance(dtype, str):
        wire.itemsize(dtype)
        return dtype
    return wire.dtype_name(dtype)
