"""Chat templates a job names (``chat_template``): a built-in family, or a Jinja file inside the roots.

Most base (non-instruct) models ship no chat template, so a chat dataset cannot be
rendered on them; a job then names one. :func:`load_chat_template` is the one loader,
used wherever chat rows are rendered: at submit (token statistics, truncation; the
text is stored with the job), by the trainer (which renders with the stored text, so
a file edited after submit changes nothing), and by ``loraq inspect --data`` (the
adapter folder's ``chat_template.jinja``, written there at publish).

A value is a built-in name when it has no ``/`` and no template suffix; otherwise it
is a file, relative to the queue file's folder, read only inside the allowed roots.

Built-ins (:data:`BUILTIN`):

- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` turns (Qwen, SmolLM, many fine-tunes).
  On a tokenizer that lacks ``<|im_start|>`` / ``<|im_end|>`` as tokens, the markers are
  trained as plain text pieces; they still delimit the turns exactly.

Standard library only at import; :mod:`jinja2` (which transformers uses to render
templates) is imported only to check that a file's template parses.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Problem, TemplateBudgetError, TemplateError
from ..queue.spec import Queue
from ..sandbox import Roots, path_errors_as
from . import budget

#: The name of the template file in a published adapter folder (as transformers saves a tokenizer's).
TEMPLATE_FILE = "chat_template.jinja"
#: Suffixes that make a value a file rather than a built-in name.
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")
#: Far more than any real template (SmolLM2's is 368 bytes, Llama 3.1's ~4 KB).
MAX_TEMPLATE_BYTES = 1 << 20

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Built-in templates by name.
BUILTIN: dict[str, str] = {"chatml": CHATML}
#: Each built-in's turn markers: submit warns when the tokenizer lacks them as tokens.
MARKERS: dict[str, tuple[str, ...]] = {"chatml": ("<|im_start|>", "<|im_end|>")}


@dataclass(frozen=True)
class TemplateSource:
    """A chat template a job named: where it came from, and its text."""

    name: str  # the value as written: a built-in name, or the path in the queue file
    text: str
    path: str | None = None  # the resolved file; None for a built-in

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256}


def is_file_ref(value: str) -> bool:
    """Whether ``value`` names a file (it has a ``/`` or a template suffix) rather than a built-in."""
    return "/" in value or "\\" in value or value.lower().endswith(TEMPLATE_SUFFIXES)


def load_chat_template(value: str, *, base_dir: Path, roots: Roots | None) -> TemplateSource:
    """The template ``value`` names: a built-in, or a file (relative to ``base_dir``) inside ``roots``.

    ``roots`` ``None`` trusts the path (one the operator typed, or a file inside a folder
    already checked). Raises :class:`TemplateError`, one line saying what is wrong.
    """
    if not is_file_ref(value):
        if value in BUILTIN:
            return TemplateSource(name=value, text=BUILTIN[value])
        raise TemplateError(f"{value!r} is not a built-in chat template (built-ins: {', '.join(sorted(BUILTIN))}); "
                            f"a template file's name ends in {' or '.join(TEMPLATE_SUFFIXES)} or contains a /")
    path = (base_dir / Path(value).expanduser()).resolve()
    if roots is not None:
        with path_errors_as(TemplateError):
            roots.check_read(path, what="chat template file")
    text = _read(path)
    problem = syntax_problem(text)
    if problem is not None:
        raise TemplateError(f"{path}: not a Jinja template: {problem}")
    return TemplateSource(name=value, text=text, path=str(path))


def _read(path: Path) -> str:
    if not path.is_file():
        raise TemplateError(f"chat template file not found: {path}" if not path.exists()
                            else f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{path}: {size:,} bytes, over the {MAX_TEMPLATE_BYTES:,}-byte cap for a chat template")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TemplateError(f"{path}: cannot be read ({exc.strerror})") from None
    if not text.strip():
        raise TemplateError(f"{path}: the chat template file is empty")
    return text


def syntax_problem(text: str) -> str | None:
    """Why ``text`` does not parse as a chat template (as transformers compiles one); ``None`` if it does."""
    try:
        import jinja2
    except ImportError:  # transformers needs jinja2 to render at all; rendering the rows will say so
        return None
    try:
        environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None


# ---------------------------------------------------------------- rendering, without transformers


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    """The Jinja environment transformers renders chat templates in (5.x ``chat_template_utils``), built here.

    The same sandbox (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
    ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` tag that
    renders its body), the same globals (``raise_exception``, ``strftime_now``, a
    ``dict`` and a ``namespace`` that refuse underscore names) and the same ``tojson``
    filter (``ensure_ascii=False``, no HTML escaping). ``loraq submit`` renders with it,
    torch-free; the trainer checks a sample against transformers' ``apply_chat_template``.
    """
    import datetime
    import json

    import jinja2
    import jinja2.compiler
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # {% generation %} ... {% endgeneration %}: the body, as rendered
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
        return datetime.datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            budget.check(value, f"namespace value {name!r}")
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    class Generator(jinja2.compiler.CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # ``a ~ b``: its size checked (data/budget.py)
            self.write("environment.budget_check(")
            super().visit_Concat(node, frame)
            self.write(")")

    class Budgeted(ImmutableSandboxedEnvironment):
        """The sandbox, with the rendering budget (data/budget.py) checked at every call, filter and operator."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = Generator

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget.binop(operator, left, right)
            result = self.binop_table[operator](left, right)
            return budget.check(result, "the result of %") if operator == "%" else result

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's names
            budget.before_call(__obj, args, kwargs)
            return budget.check(super().call(__context, __obj, *args, **kwargs), "the result of a call")

        @staticmethod
        def budget_check(value: Any) -> Any:
            return budget.check(value, "a concatenation (~)")

    env = Budgeted(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: budget.budgeted_filter(function) for name, function in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


@functools.lru_cache(maxsize=16)
def compile_template(text: str) -> Any:
    return environment().from_string(text)


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """JSON types only, as transformers passes template data (anything else becomes a ``<type>`` placeholder)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def render_chat(template: str, conversations: list[list[dict[str, Any]]], *, add_generation_prompt: bool,
                special_tokens: dict[str, str]) -> list[str]:
    """``apply_chat_template(conversations, tokenize=False, ...)`` as transformers 5 renders it, without it.

    Messages lose their ``None`` values, reasoning is aliased under the names templates read
    (``reasoning_content``, ``thinking``), and the tokenizer's named special tokens
    (``bos_token``, ``eos_token``, ...) are the template's variables, as transformers does.
    """
    compiled = compile_template(template)
    variables = _plain(dict(special_tokens))
    out = []
    for conversation in conversations:
        messages = []
        for message in conversation:
            message = _plain({k: v for k, v in message.items() if v is not None})
            reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            messages.append(message)
        out.append(budget.within(functools.partial(_render_one, compiled, messages, add_generation_prompt, variables),
                                 size=sum(len(v) for m in messages for v in m.values() if isinstance(v, str))))
    return out


def _render_one(compiled: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                variables: dict[str, Any]) -> str:
    """One conversation's text, its size checked as it is written (data/budget.py)."""
    parts: list[str] = []
    written = 0
    for part in compiled.generate(messages=messages, tools=None, documents=None,
                                  add_generation_prompt=add_generation_prompt, **variables):
        budget.tick()
        written += len(part)
        if written > budget.limit():
            raise TemplateBudgetError(f"the chat template writes over {budget.limit():,} characters for one "
                                      "conversation, past its budget")
        parts.append(part)
    return "".join(parts)


def folder_template(folder: Path) -> str | dict[str, str] | None:
    """A tokenizer folder's own chat template, found as transformers 5 finds it: ``chat_template.jinja``, then
    ``chat_templates/*.jinja`` (named), over the ``chat_template`` of ``tokenizer_config.json``."""
    import json

    named = {}
    main = folder / TEMPLATE_FILE
    if main.is_file():
        named["default"] = _read(main)
    templates_dir = folder / "chat_templates"
    if templates_dir.is_dir():
        for path in sorted(templates_dir.glob("*.jinja")):
            named[path.name.removesuffix(".jinja")] = _read(path)
    if len(named) == 1 and "default" in named:
        return named["default"]
    if named:
        return named
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(value, list):
            return {t["name"]: t["template"] for t in value}
        return value if isinstance(value, (str, dict)) and value else None
    return None


def resolve_queue_templates(queue: Queue, roots: Roots, where: str) -> tuple[Queue, list[Problem]]:
    """Each job's ``chat_template`` loaded (:func:`load_chat_template`) and stored with the job.

    The text goes into the job (``chat_template_text``): the trainer renders with the
    template as submitted. Returns the queue and a problem per job whose template fails.
    """
    problems: list[Problem] = []
    jobs = []
    for job in queue.jobs:
        value = job.spec.chat_template
        if value is None:
            jobs.append(job)
            continue
        try:
            source = load_chat_template(value, base_dir=Path(job.queue_file).parent, roots=roots)
        except TemplateError as exc:
            problems.append(Problem(f"{where}: job {job.name!r}: chat_template", str(exc)))
            continue
        jobs.append(job.model_copy(update={"chat_template_text": source.text, "chat_template_path": source.path}))
    return queue.model_copy(update={"jobs": jobs}), problems
