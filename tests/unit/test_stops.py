"""Stop strings and incremental text: nothing of a stop string is ever released."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_relay.coordinator.stops import StopMatcher, TextStream


class PieceDetokenizer:
    """Each token id stands for one fixed piece of text."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces
        self.text = ""
        self.offset = 0
        self.finalized = False

    def add_token(self, token: int) -> None:
        self.text += self.pieces[token]

    def finalize(self) -> None:
        self.finalized = True

    @property
    def last_segment(self) -> str:
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], str, bool]:
    detok = PieceDetokenizer(dict(enumerate(pieces)))
    text = TextStream(detok, stops)
    deltas = []
    for token in range(len(pieces)):
        deltas.append(text.add(token))
        if text.stopped:
            break
    deltas.append(text.finish())
    return deltas, text.text, text.stopped


def test_matcher_holds_back_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["###", "END"])
    scan = matcher.scan("hello #")
    assert (scan.release, scan.keep, scan.stopped) == ("hello ", "#", False)
    scan = matcher.scan("hello ##")
    assert (scan.release, scan.keep) == ("hello ", "##")
    scan = matcher.scan("hello E")
    assert (scan.release, scan.keep) == ("hello ", "E")


def test_matcher_truncates_before_the_earliest_stop() -> None:
    scan = StopMatcher(["END", "###"]).scan("a ### b END")
    assert (scan.release, scan.keep, scan.stopped) == ("a ", "", True)


def test_matcher_final_releases_everything_without_a_stop() -> None:
    scan = StopMatcher(["###"]).scan("tail ##", final=True)
    assert (scan.release, scan.stopped) == ("tail ##", False)


def test_matcher_rejects_empty_stop() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


def test_stop_split_across_tokens_is_never_emitted() -> None:
    deltas, text, stopped = stream(["Hello", " wor", "ld", " ST", "O", "P", " after"], ["STOP"])
    assert stopped
    assert text == "Hello world "
    assert "".join(deltas) == "Hello world "
    # "ST" and "O" were held back, not released then retracted.
    assert all("S" not in d for d in deltas)


def test_held_text_that_is_not_a_stop_is_released_later() -> None:
    deltas, text, stopped = stream(["a", " S", "T", "x", " b"], ["STOP"])
    assert not stopped
    assert text == "a STx b"
    assert deltas[:3] == ["a", " ", ""]
    assert deltas[3] == "STx"


def test_held_text_is_flushed_at_the_end() -> None:
    deltas, text, stopped = stream(["x", " ST"], ["STOP"])
    assert not stopped
    assert deltas == ["x", " ", "ST"]
    assert text == "x ST"


def test_stop_inside_one_token() -> None:
    _, text, stopped = stream(["one", " two</s>three"], ["</s>"])
    assert stopped
    assert text == "one two"


def test_no_stops_releases_each_piece_at_once() -> None:
    deltas, text, stopped = stream(["a", "b", "c"], [])
    assert deltas == ["a", "b", "c", ""]
    assert text == "abc" and not stopped


def test_tokens_after_a_stop_are_ignored() -> None:
    detok = PieceDetokenizer({0: "ab", 1: "cd"})
    text = TextStream(detok, ["b"])
    assert text.add(0) == "a"
    assert text.stopped
    assert text.add(1) == ""
    assert text.finish() == ""
    assert text.text == "a" and not detok.finalized


def test_real_tokenizer_never_splits_a_multibyte_character(tiny_model_dir: Path) -> None:
    from mlx_relay.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    source = "naïve café 東京 🚀 done"
    ids = tokenizer.encode(source)
    text = TextStream(tokenizer.detokenizer, ["done"])
    deltas = [text.add(t) for t in ids]
    deltas.append(text.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert text.stopped
    assert "".join(deltas) == source[: source.index("done")]
