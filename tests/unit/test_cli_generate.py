"""``mlx-relay generate`` on a tiny model: the streamed text is what the reference generator
produces, followed by one line of prompt and generation speed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_relay.cli import main
from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.load import load_model
from mlx_relay.model.sampling import SamplingParams
from mlx_relay.model.tokenizer import encode_prompt, eos_token_ids, load_tokenizer

STATS = re.compile(
    r"^prompt: (\d+) tokens, [\d.]+ tok/s \| generation: (\d+) tokens, [\d.]+ tok/s$"
)


def _expected(
    model_dir: Path, prompt: str, chat: bool, max_tokens: int, **sampling: float
) -> tuple[str, int, int]:
    tokenizer = load_tokenizer(model_dir)
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    eos = eos_token_ids(tokenizer)
    tokens = [
        t.token_id
        for t in generate_tokens(
            load_model(model_dir), ids, max_tokens, SamplingParams(**sampling), eos
        )  # type: ignore[arg-type]
    ]
    text = tokenizer.decode([t for t in tokens if t not in eos])
    return text, len(ids), len(tokens)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("chat", [True, False])
def test_generate_streams_the_reference_text_then_speed(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], chat: bool
) -> None:
    prompt = "The capital of France is"
    text, prompt_tokens, generated = _expected(tiny_model_dir, prompt, chat, 8)
    flag = "--chat" if chat else "--no-chat"
    code, out, _ = _run(
        capsys, "generate", prompt, "--model", str(tiny_model_dir), "--max-tokens", "8", flag
    )
    assert code == 0
    body, stats = out.rstrip("\n").rsplit("\n", 1)
    assert body == text
    match = STATS.match(stats)
    assert match, stats
    assert (int(match[1]), int(match[2])) == (prompt_tokens, generated)
    assert generated >= 1


def test_seeded_sampling_is_reproducible_from_the_command_line(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "hello", "--model", str(tiny_model_dir), "--max-tokens", "6"]
    argv += ["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "11"]
    text, _, _ = _expected(
        tiny_model_dir, "hello", True, 6, temperature=1.5, top_k=50, top_p=0.95, seed=11
    )
    first = _run(capsys, *argv)[1]
    assert first.rsplit("\n", 2)[0] == text
    assert _run(capsys, *argv)[1].rsplit("\n", 2)[0] == text


def test_invalid_sampling_parameters_give_one_error_line(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        capsys, "generate", "hi", "--model", str(tiny_model_dir), "--temperature", "-1"
    )
    assert code == 2
    assert out == ""
    assert err.strip() == "mlx-relay generate: error: temperature must be >= 0, got -1.0"


def test_missing_model_gives_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert code == 2
    assert "GGUF file not found" in err
