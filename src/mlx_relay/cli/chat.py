"""``mlx-relay chat``: an interactive chat in the terminal with a running coordinator, over its
OpenAI-compatible API, the reply streamed as it is generated."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from mlx_relay.cli.options import add_token_arguments, given_token, token_from
from mlx_relay.core.errors import RelayError

HELP = "Type a message; /reset starts over, /exit (or Ctrl-D) quits."


class ChatError(RelayError):
    """The server refused a request or cannot be reached."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with a running coordinator in the terminal",
        description="Chat with a running mlx-relay coordinator (mlx-relay up) through its "
        "OpenAI-compatible API; replies stream as they are generated.",
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:8080", help="coordinator URL (default: %(default)s)"
    )
    add_token_arguments(parser, "bearer token of the server")
    parser.add_argument("--model", help="model id (default: the one the server serves)")
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    return parser


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):
        # One log line per HTTP request would break up the conversation.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    token = token_from(given_token(args))
    with ChatSession(
        args.url,
        token=token,
        model=args.model,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    ) as session:
        print(f"chatting with {session.model} at {args.url}. {HELP}", file=sys.stderr)
        repl(session, input, sys.stdout, sys.stderr)
    return 0


def parse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of server-sent ``data:`` lines, up to ``data: [DONE]``.

    Raises:
        ChatError: The stream carries an error event.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload:
            raise ChatError(_error_message(payload))
        yield payload


@dataclass
class Reply:
    """The last reply's text and numbers."""

    text: str = ""
    completion_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None


@dataclass
class ChatSession:
    """A conversation with one coordinator; the history is resent with every message.

    Args:
        url: The coordinator's base URL.
        token: The bearer token, if the server requires one.
        model: The model id; None asks the server which one it serves.
        system: An optional system message.
        max_tokens, temperature, seed: Sampling of each reply.
    """

    url: str
    token: str | None = None
    model: str | None = None
    system: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last: Reply = field(default_factory=Reply)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(
            base_url=self.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600, connect=10)
        )
        self.reset()
        if self.model is None:
            models = self._request("GET", "/v1/models").json()
            self.model = str(models["data"][0]["id"])

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> Iterator[str]:
        """Send ``text`` and yield the reply's pieces as they arrive; the reply joins the
        history once complete (a failed or interrupted turn leaves no trace)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*self.messages, {"role": "user", "content": text}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.seed is not None:
            body["seed"] = self.seed
        reply = Reply()
        started = time.perf_counter()
        parts: list[str] = []
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise ChatError(_error_message(_json_or_text(response)))
                for event in parse_events(response.iter_lines()):
                    if event.get("usage"):
                        reply.completion_tokens = int(event["usage"]["completion_tokens"])
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
                        if piece:
                            parts.append(piece)
                            yield piece
        except httpx.HTTPError as exc:
            raise ChatError(f"cannot reach {self.url}: {exc}") from None
        reply.text = "".join(parts)
        reply.seconds = time.perf_counter() - started
        self.last = reply
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply.text},
        ]

    def _request(self, method: str, path: str) -> httpx.Response:
        try:
            response = self._http.request(method, path)
        except httpx.HTTPError as exc:
            raise ChatError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code != 200:
            raise ChatError(_error_message(_json_or_text(response)))
        return response


def repl(session: ChatSession, read: Callable[[str], str], out: TextIO, err: TextIO) -> None:
    """Read messages until /exit or end of input, printing each streamed reply."""
    while True:
        try:
            text = read("> ").strip()
        except EOFError:
            out.write("\n")
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            err.write("(conversation cleared)\n")
            continue
        try:
            for piece in session.ask(text):
                out.write(piece)
                out.flush()
        except ChatError as exc:
            out.write("\n")
            err.write(f"error: {exc}\n")
            continue
        except KeyboardInterrupt:
            out.write("\n")
            err.write("(interrupted)\n")
            continue
        out.write("\n")
        reply = session.last
        err.write(
            f"[{reply.completion_tokens} tokens in {reply.seconds:.1f} s, {reply.finish_reason}]\n"
        )


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message") or payload["error"])
    if isinstance(payload, dict) and "detail" in payload:
        return str(payload["detail"])
    return str(payload)
