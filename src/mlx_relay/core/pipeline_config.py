"""The ``network:`` and ``inference:`` sections of the cluster configuration: the gRPC links
between devices, and how the coordinator admits, batches and limits requests."""

from __future__ import annotations

from pydantic import Field, model_validator

from mlx_relay.core.tls_config import TLSConfig
from mlx_relay.core.validation import ConfigSection, FieldProblem


class NetworkConfig(ConfigSection):
    """The gRPC links. Timeouts are in seconds. ``tls`` turns on TLS for every link
    (:mod:`mlx_relay.core.tls_config`). ``maximum_concurrent_rpcs`` caps the calls one worker
    serves at once (more are answered RESOURCE_EXHAUSTED); None = 256, or 4 per
    ``inference.max_running_requests`` when that is more."""

    connect_timeout: float = Field(default=60.0, gt=0)
    request_timeout: float = Field(default=30.0, gt=0)
    ping_timeout: float = Field(default=2.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff: float = Field(default=0.2, ge=0)
    max_message_mb: int = Field(default=64, ge=1, le=1024)
    auth_token: str | None = None
    tls: TLSConfig | None = None
    maximum_concurrent_rpcs: int | None = Field(default=None, ge=1)
    # How long requests wait for a failed stage to serve again, then are replayed and go
    # on (coordinator/recovery.py); 0 fails them at once.
    recovery_timeout: float = Field(default=60.0, ge=0)
    # Forward calls (the coordinator's and each stage's relay hop) on one long-lived gRPC
    # stream per worker, not a new HTTP/2 stream each (mlx_relay/stream_client.py); off:
    # unary calls.
    forward_stream: bool = True
    # Forward calls on a plain TCP connection to a second port of each worker (any free
    # one, named to callers on the stream), not on gRPC: about 0.3 ms less a hop on
    # loopback (mlx_relay/direct_link.py). Needs forward_stream; not under tls.
    direct_link: bool = True


class InferenceConfig(ConfigSection):
    max_running_requests: int = Field(default=16, ge=1)
    max_waiting_requests: int = Field(default=64, ge=0)
    default_max_tokens: int = Field(default=256, ge=1)
    max_prompt_tokens: int = Field(default=4096, ge=1)
    # Input limits, checked before the prompt is tokenized (coordinator/prepare.py): the
    # prompt's (or the messages' text) UTF-8 bytes, None = 32 per max_prompt_tokens (no
    # tokenizer's tokens are longer on real text); chat messages; characters of a stop string.
    max_prompt_bytes: int | None = Field(default=None, ge=1)
    max_messages: int = Field(default=1024, ge=1)
    max_stop_length: int = Field(default=256, ge=1)
    # Tokens a streamed request may generate ahead of its reader: with this many unread,
    # the request takes no decode step until its reader catches up (to half of it).
    stream_buffer_tokens: int = Field(default=32, ge=1)
    session_ttl_seconds: float = Field(default=300.0, gt=0)
    max_sessions: int = Field(default=64, ge=1)
    # KV sessions one peer (a client certificate's subject, else a client address) may hold
    # on a stage; None = see peer_session_quota. Never below coordinator_sessions: the
    # coordinator (or the stage before, relaying) is one peer holding that many.
    max_sessions_per_peer: int | None = Field(default=None, ge=1)
    # Continuous batching (coordinator/scheduler.py): most requests in one micro-batch, and
    # most prompt positions one micro-batch prefills (longer prompts go in chunks; never
    # more than max_prompt_tokens, the most positions a worker takes in one step).
    max_batch_size: int = Field(default=16, ge=1)
    prefill_chunk_tokens: int = Field(default=512, ge=1)
    # Micro-batches in flight at once; None = one per machine the stages run on, so that
    # with stages on separate devices every stage has work, while stages sharing one
    # machine's cores get one larger batch (coordinator/scheduler.py, default_micro_batches).
    micro_batches: int | None = Field(default=None, ge=1)
    # First-token priority (coordinator/scheduler.py): a new request whose prompt prefills in
    # at most this many positions, arriving while other streams run, gets its prefill and
    # first decode step in micro-batches of their own, ahead of the streams; 0 = off.
    first_token_priority_tokens: int = Field(default=64, ge=0)
    # Chained steps (coordinator/scheduler.py): while one decode batch of at most this many
    # requests holds every running request, its next step goes to the first stage before
    # this one is back and starts from the tokens the last stage samples as they come back
    # up the chain (no round trip through the coordinator per token); 0 = off; None = 4
    # where the coordinator's machine computes on a GPU, 0 on a CPU-only one (there the
    # stages' compute takes every core, and the coordinator's work beside it costs a step
    # more than the round trip it saves: README, "Performance").
    chained_steps_max_batch: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _peer_quota(self) -> InferenceConfig:
        quota, floor = self.max_sessions_per_peer, self.coordinator_sessions
        if quota is not None and quota < floor:
            raise FieldProblem(
                "inference.max_sessions_per_peer",
                f"expected at least {floor} (twice max_running_requests, at most "
                f"max_sessions): the coordinator is one peer, got {quota}",
            )
        return self

    @property
    def coordinator_sessions(self) -> int:
        """The sessions the coordinator may hold on one stage: one per running request, and
        as many again whose EndSession is still on its way (a finished request's slot is
        free before its sessions end); never more than ``max_sessions``."""
        return min(self.max_sessions, 2 * self.max_running_requests)

    @property
    def peer_session_quota(self) -> int:
        """Sessions one peer may hold on a stage: ``max_sessions_per_peer``, else three
        quarters of ``max_sessions``, or :attr:`coordinator_sessions` when that is more."""
        if self.max_sessions_per_peer is not None:
            return self.max_sessions_per_peer
        return max(-(-self.max_sessions * 3 // 4), self.coordinator_sessions)
