"""service/generate.py's :class:`Answer`: the text a stream sends as tokens arrive, with the demo's real tokenizer.

Byte-level BPE splits a multi-byte character across tokens, so decoding a token on
its own gives half a character: the answer must hold it back until the rest comes.
Stop sequences must cut the text before them, whichever token completes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraq.service.generate import Answer

TEXT = "Grüße aus Köln: naïve café, 日本語のテキスト 🙂👍\nsecond line\n\n  spaced out, refund #42."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from loraq.demo import build_tokenizer

    return build_tokenizer(Path(tmp_path_factory.mktemp("tokenizer")))


def stream(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[list[str], Answer]:
    """What a stream sends, a piece per token (then the end's), as the generation thread feeds it."""
    answer = Answer(tokenizer, stops)
    pieces = []
    for token in ids:
        pieces.append(answer.add([token]))
        if answer.stopped:
            break
    pieces.append(answer.finish())
    return pieces, answer


def test_a_stream_never_sends_half_a_character_and_adds_up_to_the_whole_decode(tokenizer: Any) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    whole_chars = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in piece for piece in whole_chars), "the text must split a character across tokens"
    pieces, answer = stream(tokenizer, ids, [])
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == TEXT == answer.final
    assert not answer.stopped


@pytest.mark.parametrize("stop", ["Köln", "ü", "テキ", "🙂", "\n\n", "d l", "#42."])
def test_a_stop_sequence_cuts_the_stream_before_it_whichever_token_completes_it(tokenizer: Any, stop: str) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, answer = stream(tokenizer, ids, ["never there", stop])
    expected = TEXT[:TEXT.index(stop)]
    assert "".join(pieces) == expected == answer.final
    assert answer.stopped
    # nothing past the stop's start was ever sent, not even for a moment
    sent = ""
    for piece in pieces:
        sent += piece
        assert expected.startswith(sent)


def test_without_a_stop_the_text_is_sent_as_it_comes_not_at_the_end(tokenizer: Any) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, _ = stream(tokenizer, ids, [])
    assert sum(1 for piece in pieces[:-1] if piece) > len(ids) // 2
    held, _ = stream(tokenizer, ids, ["xyzzy-12345"])  # a long stop holds back only its length less one
    assert len(held[-1]) == len("xyzzy-12345") - 1
