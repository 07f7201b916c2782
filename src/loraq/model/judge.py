"""A model judge: an OpenAI-compatible chat endpoint scores each answer to an eval prompt (``validation.judge``).

Every answer (the base's and the adapter's, to the same first ``max_rows`` eval prompts)
is sent as one chat completion request, ``POST {endpoint}/chat/completions``:

.. code-block:: text

    system: You are a strict, consistent grader. Score the ANSWER to the PROMPT against the
            REFERENCE answer, following this rubric:
            <rubric>
            Reply with one integer from 0 (worst) to 10 (best) and nothing else.
    user:   PROMPT:
            <the eval row's prompt, as the model saw it>

            REFERENCE:
            <the eval row's answer>

            ANSWER:
            <the model's greedy answer>

with ``temperature: 0`` and ``max_tokens: 8``. The first number in the reply, clamped to 0-10
and divided by 10, is the row's score; the metric ``judge`` is the mean over the rows (0 to 1,
higher better), ``base_judge`` the base's. Requests run ``concurrency`` at a time, each with a
``timeout_s`` limit (and the whole pass within ten times that). A reply that fails,
times out or holds no number leaves the metric unmeasured: a judge never fails the training,
and a gate on ``judge`` that was not measured warns instead of failing (inspect/verdict.py).
The key, when the endpoint needs one, is read from the environment variable ``api_key_env``
names, never from the queue file.

Standard library only (``urllib``, threads): no client library to install or to configure.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

SYSTEM_PROMPT = ("You are a strict, consistent grader. Score the ANSWER to the PROMPT against the REFERENCE answer, "
                 "following this rubric:\n{rubric}\nReply with one integer from 0 (worst) to 10 (best) and nothing else.")
USER_PROMPT = "PROMPT:\n{prompt}\n\nREFERENCE:\n{reference}\n\nANSWER:\n{answer}"
#: Characters of a prompt, reference or answer sent to the judge.
MAX_CHARS = 8000
#: Bytes of a reply read.
MAX_REPLY_BYTES = 1 << 20
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class JudgeSettings:
    """``validation.judge`` (queue.spec.JudgeSpec), as the trainer passes it."""

    endpoint: str
    model: str
    rubric: str
    api_key_env: str | None = None
    timeout_s: float = 30.0
    concurrency: int = 4
    max_rows: int = 64


@dataclass
class Verdicts:
    """What one judging pass gave: the mean score, or ``None`` with why."""

    score: float | None
    rows: int
    errors: list[str] = field(default_factory=list)


def messages(rubric: str, prompt: str, reference: str, answer: str) -> list[dict[str, str]]:
    """The chat messages that ask the judge to score one answer (the documented prompt)."""
    return [{"role": "system", "content": SYSTEM_PROMPT.format(rubric=rubric)},
            {"role": "user", "content": USER_PROMPT.format(prompt=prompt[-MAX_CHARS:], reference=reference[:MAX_CHARS],
                                                           answer=answer[:MAX_CHARS])}]


def parse_score(reply: str) -> float | None:
    """The first number of ``reply``, clamped to 0-10, as 0 to 1; ``None`` if it holds none."""
    found = _NUMBER.search(reply)
    if found is None:
        return None
    return min(max(float(found.group()), 0.0), 10.0) / 10.0


def _ask(settings: JudgeSettings, body: dict[str, Any], deadline: float) -> float:
    timeout = min(settings.timeout_s, deadline - time.monotonic())
    if timeout <= 0:
        raise TimeoutError("the judge's time for this job ran out")
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{settings.endpoint}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - an http(s) URL (queue.spec)
        reply = json.loads(response.read(MAX_REPLY_BYTES))
    content = reply["choices"][0]["message"]["content"]
    score = parse_score(content if isinstance(content, str) else "")
    if score is None:
        raise ValueError(f"the judge's reply holds no score: {str(content)[:80]!r}")
    return score


def judge(settings: JudgeSettings, prompts: Sequence[str], references: Sequence[str],
          answers: Sequence[str]) -> Verdicts:
    """Score ``answers`` (one per prompt and reference) with the judge; never raises for the judge's faults."""
    rows = list(zip(prompts, references, answers, strict=True))[:settings.max_rows]
    if not rows:
        return Verdicts(None, 0, ["no eval prompt to judge"])
    deadline = time.monotonic() + settings.timeout_s * 10
    bodies = [{"model": settings.model, "messages": messages(settings.rubric, p, r, a), "temperature": 0,
               "max_tokens": 8} for p, r, a in rows]
    errors: list[str] = []

    def one(body: dict[str, Any]) -> float | None:
        try:
            return _ask(settings, body, deadline)
        except (OSError, ValueError, KeyError, IndexError, TypeError, TimeoutError, urllib.error.URLError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return None

    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="loraq-judge")
    futures = [pool.submit(one, body) for body in bodies]
    # The whole pass within its deadline (a server that trickles its reply byte by byte included): what has
    # not answered by then is abandoned, and the metric is unmeasured.
    done, late = wait(futures, timeout=max(deadline - time.monotonic(), 0.0) + 1.0)
    pool.shutdown(wait=False, cancel_futures=True)
    if late:
        errors.append(f"{len(late)} answer(s) not scored within {settings.timeout_s * 10:g} s")
    scores = [score for f in futures if f in done and (score := f.result()) is not None]
    if errors or len(scores) != len(rows):
        return Verdicts(None, len(rows), errors[:5] or ["not every answer was scored"])
    return Verdicts(sum(scores) / len(scores), len(rows))
