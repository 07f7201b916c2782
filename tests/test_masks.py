"""Loss masks token by token: which tokens of a rendered row carry a label, for every format."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraq import data, demo
from loraq.data import IGNORE_INDEX


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("masks-tokenizer")
    demo.build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)  # as the trainer and submit load it


def tokens_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def expected(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """ids and labels of ``pieces`` (text, trained) tokenised one by one.

    Every piece boundary here sits at a special token or a newline, where the demo's
    byte-level BPE splits anyway, so the pieces' tokens are the whole text's tokens.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokens_of(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def shown(tokenizer: Any, encoded: data.Encoded) -> list[tuple[str, bool]]:
    return [(tokenizer.decode([i]), label != IGNORE_INDEX) for i, label in zip(encoded.input_ids, encoded.labels, strict=True)]


def turn(role: str, content: str, trained: bool = False) -> list[tuple[str, bool]]:
    """The demo template's rendering of one turn: header untrained, content + end marker as given."""
    return [(f"<|{role}|>\n", False), (content, trained), ("<|end|>\n", trained)]


def test_chat_multi_turn_with_a_weight_zero_turn(tokenizer: Any) -> None:
    row = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Use Settings.", "weight": 0},
        {"role": "user", "content": "Where is that?"},
        {"role": "assistant", "content": "Top right, then Security."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome.", "weight": 1},
    ]}
    encoded = data.encode(row, "chat", tokenizer, max_seq_len=512)
    pieces = [("<|bos|>", False), *turn("system", "You are terse."), *turn("user", "How do I reset my password?"),
              *turn("assistant", "Use Settings."), *turn("user", "Where is that?"),
              *turn("assistant", "Top right, then Security.", trained=True), *turn("user", "Thanks"),
              *turn("assistant", "You are welcome.", trained=True)]
    assert (encoded.input_ids, encoded.labels) == expected(tokenizer, pieces)
    trained_text = "".join(text for text, trained in shown(tokenizer, encoded) if trained)
    assert trained_text == "Top right, then Security.<|end|>\nYou are welcome.<|end|>\n"
    # the weight-0 turn and every header stay unlabelled, token by token
    view = shown(tokenizer, encoded)
    assert ("<|assistant|>", False) in view
    assert not any(trained for text, trained in view if text in ("Use", " Settings", "<|user|>", "<|system|>"))
    assert not encoded.truncated


def test_chat_single_turn_trains_the_answer_and_its_end_marker_only(tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
    encoded = data.encode(row, "chat", tokenizer, max_seq_len=512)
    pieces = [("<|bos|>", False), *turn("user", "Hi"), *turn("assistant", "Hello there.", trained=True)]
    assert (encoded.input_ids, encoded.labels) == expected(tokenizer, pieces)


def test_chat_turn_before_a_trailing_user_turn(tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Bye"}]}
    encoded = data.encode(row, "chat", tokenizer, max_seq_len=512)
    pieces = [("<|bos|>", False), *turn("user", "Hi"), *turn("assistant", "Hello.", trained=True), *turn("user", "Bye")]
    assert (encoded.input_ids, encoded.labels) == expected(tokenizer, pieces)


def test_prompt_completion_trains_the_completion_and_eos(tokenizer: Any) -> None:
    row = {"prompt": "Question: How many users are in Oslo?\nSQL:", "completion": "\nSELECT COUNT(*) FROM users;"}
    encoded = data.encode(row, "prompt_completion", tokenizer, max_seq_len=512)
    pieces = [(row["prompt"], False), (row["completion"], True), ("<|eos|>", True)]
    assert (encoded.input_ids, encoded.labels) == expected(tokenizer, pieces)
    assert shown(tokenizer, encoded)[-1] == ("<|eos|>", True)


def test_a_token_straddling_the_prompt_boundary_is_not_trained(tokenizer: Any) -> None:
    # "Ber" + "lin": BPE may merge across the boundary; a token is trained only if it starts in the completion
    row = {"prompt": "The city of Ber", "completion": "lin and Oslo"}
    encoded = data.encode(row, "prompt_completion", tokenizer, max_seq_len=512)
    enc = tokenizer(row["prompt"] + row["completion"] + "<|eos|>", add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    assert encoded.input_ids == list(enc["input_ids"])
    boundary = len(row["prompt"])
    assert [label != IGNORE_INDEX for label in encoded.labels] == [start >= boundary for start in starts]


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_trains_the_output_and_eos(tokenizer: Any, with_input: bool) -> None:
    row = {"instruction": "Describe the animal.", "input": "red fox" if with_input else "", "output": "A red fox, asleep."}
    encoded = data.encode(row, "alpaca", tokenizer, max_seq_len=512)
    template = data.ALPACA_PROMPT_INPUT if with_input else data.ALPACA_PROMPT
    prompt = template.format(instruction=row["instruction"], input=row["input"])
    assert (encoded.input_ids, encoded.labels) == expected(tokenizer, [(prompt, False), (row["output"], True),
                                                                       ("<|eos|>", True)])


def test_text_trains_everything(tokenizer: Any) -> None:
    encoded = data.encode({"text": "The red fox walked to Oslo."}, "text", tokenizer, max_seq_len=512)
    assert encoded.labels == encoded.input_ids
    assert shown(tokenizer, encoded)[-1] == ("<|eos|>", True)


def test_truncation_cuts_ids_and_labels_together(tokenizer: Any) -> None:
    row = {"prompt": "Question: List all users in Berlin.\nSQL:", "completion": " SELECT * FROM users;"}
    full = data.encode(row, "prompt_completion", tokenizer, max_seq_len=512)
    cut = data.encode(row, "prompt_completion", tokenizer, max_seq_len=8)
    assert cut.truncated and not full.truncated
    assert (cut.input_ids, cut.labels) == (full.input_ids[:8], full.labels[:8])
    assert cut.trainable == 0 < full.trainable  # the prompt fills the window: nothing left to train


ROWS = {
    "chat": [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"Question {i}?"},
                           {"role": "assistant", "content": f"Answer {i}.", "weight": i % 2},
                           {"role": "user", "content": "More"}, {"role": "assistant", "content": f"Yes {i}"}]}
             for i in range(12)],
    "prompt_completion": [{"prompt": f"Count {i}:", "completion": f" {i} {i + 1}"} for i in range(12)],
    "alpaca": [{"instruction": f"Say {i}", "input": "" if i % 2 else "x", "output": f"{i}"} for i in range(12)],
    "text": [{"text": f"Row number {i}."} for i in range(12)],
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_batched_encoding_equals_one_row_at_a_time(tokenizer: Any, fmt: str) -> None:
    many = data.encode_many(ROWS[fmt], fmt, tokenizer, max_seq_len=20)
    assert many == [data.encode(row, fmt, tokenizer, max_seq_len=20) for row in ROWS[fmt]]


class _NoBackend:
    """The tokenizer without its Rust backend: tokenize_many must take the plain path."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


def test_fast_and_plain_tokenising_agree(tokenizer: Any) -> None:
    texts = [r.text for r in data.render_many(ROWS["chat"], "chat", tokenizer)]  # type: ignore[union-attr]
    fast = data.tokenize_many(tokenizer, texts, False)
    plain = data.tokenize_many(_NoBackend(tokenizer), texts, False)
    assert not isinstance(fast[-1], type(plain[-1]))  # the fast path really ran
    assert [(list(f.ids), list(f.offsets)) for f in fast] == [(p.ids, p.offsets) for p in plain]


text_piece = st.lists(st.sampled_from(list("ab xyz.\n") + ["é", "東", "<|end|>", "<|eos|>", "  "]), max_size=12).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=text_piece, completion=text_piece.filter(lambda s: s.strip() != ""), chat=st.booleans())
def test_first_label_agrees_with_the_labels(tokenizer: Any, prompt: str, completion: str, chat: bool) -> None:
    if chat:
        row: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
        fmt = "chat"
    else:
        row, fmt = {"prompt": prompt, "completion": completion}, "prompt_completion"
    rendered = data.render(row, fmt, tokenizer)
    tokens = data.tokenize_many(tokenizer, [rendered.text] * 6, rendered.add_special_tokens)[0]  # the fast path
    labels = data.encode(row, fmt, tokenizer, max_seq_len=10_000).labels
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), -1)
    assert data.first_label(tokens, rendered.spans) == first


def with_template(tokenizer: Any, template: str | None) -> Any:
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_no_chat_template_is_an_error_for_chat(tokenizer: Any) -> None:
    with pytest.raises(data.TemplateError, match="has no chat template.*set the job.s chat_template"):
        data.render_many(ROWS["chat"], "chat", with_template(tokenizer, None))


def test_a_row_the_template_rejects_is_an_error_for_that_row_only(tokenizer: Any) -> None:
    strict = with_template(tokenizer, "{% for m in messages %}{% if m['role'] == 'system' %}"
                                      "{{ raise_exception('no system messages') }}{% endif %}"
                                      "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]} for i in range(8)]
    rows[5] = ROWS["chat"][0]  # has a system message
    rendered = data.render_many(rows, "chat", strict)
    assert [isinstance(r, data.TemplateError) for r in rendered] == [i == 5 for i in range(8)]
    assert "no system messages" in str(rendered[5])
    with pytest.raises(data.TemplateError, match="row 6"):
        data.encode_many(rows, "chat", strict, 64)


def test_a_template_that_is_not_prefix_stable_is_found(tokenizer: Any) -> None:
    # like templates that drop earlier reasoning: the text before a turn changes once later turns exist
    unstable = with_template(tokenizer, "{{ messages|length }}|{% for m in messages %}{{ m['content'] }};{% endfor %}"
                                        "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(data.TemplateError, match="prefix"):
        data.render(ROWS["chat"][1], "chat", unstable)


def test_render_is_the_same_through_the_fast_template_path(tokenizer: Any) -> None:
    rows = ROWS["chat"] * 2
    batched = data.render_many(rows, "chat", tokenizer)  # more than the sample: the compiled template renders
    assert batched == [data.render(row, "chat", tokenizer) for row in rows]


def test_template_messages_drop_weight_and_nulls(tokenizer: Any) -> None:
    # Parquet gives every message every struct field, null where absent; templates must not see them
    seen = with_template(tokenizer, "{% for m in messages %}{{ m|dictsort }}\n{% endfor %}")
    row = {"messages": [{"role": "user", "content": "Hi", "weight": None, "name": None},
                        {"role": "assistant", "content": "Yo", "weight": 1, "name": None}]}
    text = data.render(row, "chat", seen).text
    assert "weight" not in text and "None" not in text and "name" not in text


def test_labels_for_spans() -> None:
    ids = [10, 11, 12, 13, 14]
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 9)]
    assert data.labels_for(ids, offsets, [(3, 9)]) == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX]
    assert data.labels_for(ids, offsets, [(0, 3), (5, 6)]) == [IGNORE_INDEX, 11, IGNORE_INDEX, 13, IGNORE_INDEX]


def test_session_tokenizer_is_a_real_fast_tokenizer(tokenizer: Any) -> None:
    assert tokenizer.is_fast and tokenizer.chat_template == demo.CHAT_TEMPLATE


chat_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": text_piece},
    optional={"weight": st.sampled_from([0, 1, None])})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(chat_message, min_size=1, max_size=5))
def test_every_chat_row_that_passes_the_checks_trains_on_something(tokenizer: Any, messages: list[dict[str, Any]]) -> None:
    row = {"messages": messages}
    if data.row_problem(row, "chat") is not None:
        return
    encoded = data.encode(row, "chat", tokenizer, max_seq_len=10_000)
    assert encoded.trainable > 0
    trained_turns = [m for m in messages if m["role"] == "assistant" and m.get("weight") != 0]
    labelled = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX])
    assert labelled.count("<|end|>") >= len(trained_turns)  # each trained turn ends with its end marker
