"""The budget a chat template renders within: time, and the size of what it builds.

A chat template is code a job brings (a ``.jinja`` file, or the base model's own), and
Jinja's sandbox stops it from reaching Python, not from running long or building
huge strings: nested ``range(99999)`` loops hang, ``{{ 'x' * 3000000000 }}`` grows
until memory runs out. Every rendering of a conversation, wherever it runs (submit
and ``--dry-run``, ``inspect --data``, the trainer), runs :func:`within`:

- *time*: :data:`SECONDS` a conversation (a batch given to transformers: that plus a
  little a conversation). The environment's hooks check the deadline at every call,
  filter and operator; a loop without any (``{% for a in s %}{% for b in s %}``) is
  interrupted by a watchdog thread that raises into the rendering thread, as a signal
  would (``PyThreadState_SetAsyncExc``: any thread, not only the main one).
- *size*: :data:`CHARS` characters (plus four times the conversation's own size) for
  the text, and for any string, list or number built on the way, checked *before* an
  operator, call or filter that would build it (``*``, ``**``, ``+``, ``%``, ``~``,
  ``replace``, ``join``, ``indent``, widths in ``format``), so it is never allocated.
  A ``MemoryError`` that still escapes is a budget error too.

Past either, :class:`~loraq.errors.TemplateBudgetError`: the template is at fault, not
the row, so the callers stop at the first and name the template. Standard library only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import TemplateBudgetError

#: Seconds one conversation may take to render: real templates take well under a millisecond.
SECONDS = 5.0
#: A batch given to transformers' ``apply_chat_template`` gets :data:`SECONDS` plus this a conversation.
SECONDS_EACH = 0.01
#: Characters the text of one conversation, and any string or list built on the way, may hold (beyond four
#: times the conversation's own size): Llama 3.1's template renders a long conversation in a few KB.
CHARS = 4 << 20
#: Bits an integer built by ``*`` or ``**`` may hold (a number of 19,700 digits).
INT_BITS = 1 << 16

T = TypeVar("T")
_DIGITS = re.compile(r"[0-9]+")


class _Timeout(BaseException):
    """Raised into a rendering thread past its deadline. A BaseException: no ``except Exception`` on the way
    (Jinja's, a template helper's) swallows it."""


class _State(threading.local):
    deadline: float | None = None
    limit: int = CHARS


_STATE = _State()


def _interrupt(ident: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


class _Watchdog:
    """One daemon thread a process: raises :class:`_Timeout` into a thread still rendering past its deadline.

    Arming and disarming are a dictionary write under a lock, once a conversation: the thread polls
    every :data:`POLL_S` while renderings come (no wake-up a conversation), and sleeps when none has
    come for :data:`IDLE_S`.
    """

    POLL_S = 0.2
    IDLE_S = 10.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}
        self._fired: set[int] = set()
        self._thread: threading.Thread | None = None
        self._idle = True
        self._busy_at = 0.0

    def arm(self, ident: int, deadline: float) -> None:
        with self._cond:
            self._deadlines[ident] = deadline
            self._fired.discard(ident)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="loraq-template-watchdog", daemon=True)
                self._thread.start()
            if self._idle:
                self._cond.notify()

    def disarm(self, ident: int) -> None:
        with self._cond:
            self._deadlines.pop(ident, None)
            if ident in self._fired:  # fired as the rendering ended: a timeout not yet raised is cleared
                self._fired.discard(ident)
                _interrupt(ident, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ident, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[ident]
                        self._fired.add(ident)
                        _interrupt(ident, _Timeout)
                if self._deadlines:
                    self._busy_at = now
                self._idle = not self._deadlines and now - self._busy_at > self.IDLE_S
                self._cond.wait(None if self._idle else self.POLL_S)


_WATCHDOG = _Watchdog()


def _after_fork() -> None:
    # A forked child has no watchdog thread, and its lock may have been held by the parent's at the fork.
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_after_fork)


def within(render: Callable[[], T], *, seconds: float = SECONDS, size: int = 0) -> T:
    """``render()`` within the budget: :data:`SECONDS` (or ``seconds``), :data:`CHARS` plus four times ``size``.

    Nested calls run within the outer budget. Raises :class:`TemplateBudgetError`, one line.
    """
    if _STATE.deadline is not None:  # within an outer budget: its deadline holds, the larger size
        outer = _STATE.limit
        _STATE.limit = max(outer, CHARS + 4 * size)
        try:
            return render()
        finally:
            _STATE.limit = outer
    ident = threading.get_ident()
    try:
        try:
            _STATE.limit = CHARS + 4 * size
            _STATE.deadline = time.monotonic() + seconds
            _WATCHDOG.arm(ident, _STATE.deadline)
            return render()
        finally:
            _STATE.deadline, _STATE.limit = None, CHARS
            _WATCHDOG.disarm(ident)
    except _Timeout:
        raise TemplateBudgetError(f"the chat template ran past its {seconds:g} s budget rendering one conversation "
                                  "(a loop that does not end?)") from None
    except MemoryError:
        raise TemplateBudgetError("the chat template ran out of memory rendering one conversation") from None


def limit() -> int:
    """Characters (or items) a value built while rendering may hold."""
    return _STATE.limit


def tick() -> None:
    """Past the deadline: stop now (a hook point: every call, filter and operator)."""
    deadline = _STATE.deadline
    if deadline is not None and time.monotonic() > deadline:
        raise _Timeout


def _too_big(what: str, size: int) -> TemplateBudgetError:
    return TemplateBudgetError(f"the chat template would build {what} of {size:,} characters or items, over its "
                               f"budget of {limit():,}")


def weight(value: Any, cap: int | None = None) -> int:
    """Characters and items in ``value``, strings and containers counted through, stopping once past ``cap``."""
    cap = limit() if cap is None else cap
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, int | float | bool) or value is None:
        return 1
    total = 0
    stack = [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += len(item)
            stack.extend(item)
        else:
            total += 1
    return total


def check(value: T, what: str = "a value") -> T:
    """``value`` if it is within the size budget, else :class:`TemplateBudgetError`."""
    if isinstance(value, str):  # the hot path (isinstance tests the exact type first); Markup is a str too
        if len(value) > _STATE.limit:
            raise _too_big(what, len(value))
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > INT_BITS:
            raise TemplateBudgetError(f"the chat template would build a number of {value.bit_length():,} bits, "
                                      f"over its budget of {INT_BITS:,}")
        return value
    size = weight(value)
    if size > limit():
        raise _too_big(what, size)
    return value


def _format_widths(text: str) -> None:
    """Widths and precisions in a ``%`` or ``{}`` format string, each within the budget."""
    for found in _DIGITS.findall(text):
        if len(found) > 12 or int(found) > limit():
            raise TemplateBudgetError(f"the chat template formats with a width of {found[:20]} characters, over its "
                                      f"budget of {limit():,}")


def binop(operator: str, left: Any, right: Any) -> None:
    """Before ``left <operator> right``: refuse what would build past the budget (the size of ``*``, ``**`` and
    ``+`` is known before; ``%`` is checked after too). The hot path: ``+`` of two strings."""
    if operator == "+" and type(left) is str and type(right) is str:
        if len(left) + len(right) > _STATE.limit:
            raise _too_big("a concatenation", len(left) + len(right))
        return
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*":
        if ints:
            if left.bit_length() + right.bit_length() > INT_BITS:
                raise TemplateBudgetError(f"the chat template would build a number past its budget of {INT_BITS:,} bits")
            return
        seq, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(times, int) and times > 0 and isinstance(seq, str | bytes | list | tuple):
            size = weight(seq) * times
            if size > limit():
                raise _too_big("a repetition", size)
    elif operator == "**" and ints and abs(left) > 1 and right > 0:
        if right * left.bit_length() > INT_BITS:
            raise TemplateBudgetError(f"the chat template would build a number past its budget of {INT_BITS:,} bits")
    elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
        size = weight(left) + weight(right)
        if size > limit():
            raise _too_big("a concatenation", size)
    elif operator == "%" and isinstance(left, str):
        _format_widths(left)


def _numbers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit():
            shown = f"{value:,}" if value.bit_length() <= 64 else f"of {value.bit_length():,} bits"
            raise TemplateBudgetError(f"the chat template passes a number {shown} to a function or filter, over "
                                      f"its budget of {limit():,}")


def _strings(args: tuple[Any, ...]) -> list[str]:
    return [a for a in args if isinstance(a, str)]


def before_call(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before a call, a method or a filter: refuse numbers past the budget and the known growers' results.

    (Time is the watchdog's: no hook needs to read the clock.)"""
    _numbers(args, kwargs)
    name = getattr(function, "__name__", "")
    # a method of a string, or one the sandbox wrapped (its str.format keeps the method as __wrapped__)
    owner = getattr(function, "__self__", None) or getattr(getattr(function, "__wrapped__", None), "__self__", None)
    if isinstance(owner, str):  # a method of a string: the string is its first argument
        args = (owner, *args)
    if type(function).__name__ == "Macro":  # a macro's arguments: lists nested into themselves grow exponentially
        for value in (*args, *kwargs.values()):
            check(value, "a macro argument")
    strings = _strings(args)
    if name in ("replace", "do_replace") and len(strings) >= 3:
        text, old, new = strings[:3]
        count = len(text) + 1 if not old else text.count(old)
        size = len(text) + count * max(0, len(new) - len(old))
        if size > limit():
            raise _too_big("a replacement", size)
    elif name in ("join", "do_join"):
        items = next((a for a in args if isinstance(a, list | tuple)), None)
        separator = strings[0] if strings else ""
        if items is not None:
            size = weight(items) + len(separator) * len(items)
            if size > limit():
                raise _too_big("a join", size)
    elif name == "do_indent" and strings:
        width = next((a for a in args[1:] if isinstance(a, int | str) and not isinstance(a, bool)), 4)
        size = len(strings[0]) + (strings[0].count("\n") + 1) * (width if isinstance(width, int) else len(width))
        if size > limit():
            raise _too_big("an indented text", size)
    elif name == "expandtabs" and strings:
        size = len(strings[0]) + strings[0].count("\t") * int(args[1] if len(args) > 1 else 8)
        if size > limit():
            raise _too_big("an expanded text", size)
    elif name in ("format", "format_map", "do_format") and strings:
        _format_widths(strings[0])


def budgeted_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """A Jinja filter that checks its arguments before it runs and its result after (keeps ``jinja_pass_arg``)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before_call(function, args, kwargs)
        return check(function(*args, **kwargs), f"the result of the {function.__name__.removeprefix('do_')} filter")

    return wrapper
