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

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PathError, Problem, TemplateError
from ..queue.spec import Queue
from ..sandbox import Roots

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
        try:
            roots.check_read(path, what="chat template file")
        except PathError as exc:
            raise TemplateError(str(exc)) from None
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
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # transformers needs jinja2 to render at all; rendering the rows will say so
        return None

    class _Generation(Extension):  # transformers' {% generation %} ... {% endgeneration %} tag, parsed only
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
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
