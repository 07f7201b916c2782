"""The home: where loraq keeps its state, checkpoints, adapters and reports.

    loraq.db                      the state
    config.yaml                   operator settings (allow_roots, allow_remote_code, limits, models, api)
    jobs/<id>/attempt-<n>/        checkpoints/, train.log, staging/
    adapters/<name>/              published adapters
    reports/                      queue reports
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import safeyaml
from .errors import Problem, SpecError, StoreError, UsageError, YamlProblem
from .escape import printable
from .sandbox import Roots, hf_cache_dir

DEFAULT_HOME = ".loraq"
#: The two files of a PEFT LoRA adapter folder (staged, published, and in each checkpoint).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def locate(cls, home: str | os.PathLike[str] | None = None) -> Home:
        """The home named by ``--home``, else ``LORAQ_HOME``, else ``./.loraq``."""
        chosen = home or os.environ.get("LORAQ_HOME") or DEFAULT_HOME
        named = "--home" if home else "LORAQ_HOME" if os.environ.get("LORAQ_HOME") else "the home"
        try:
            root = Path(chosen).expanduser().absolute()
            if root.exists() and not root.is_dir():
                raise UsageError(f"{named} {printable(root)}: is a file, not a folder")
        except ValueError:  # a NUL byte
            raise UsageError(f"{named} {printable(chosen)!r}: holds a NUL byte; not a usable path") from None
        except OSError as exc:  # a name too long, a loop
            raise UsageError(f"{named} {printable(chosen)!r}: {exc.strerror or exc}") from None
        return cls(root)

    @property
    def db_path(self) -> Path:
        return self.root / "loraq.db"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def job_dir(self, job_id: int) -> Path:
        return self.jobs_dir / str(job_id)

    def attempt_dir(self, job_id: int, attempt: int) -> Path:
        return self.job_dir(job_id) / f"attempt-{attempt}"

    def adapter_dir(self, name: str) -> Path:
        return self.adapters_dir / name

    def ensure(self) -> None:
        for folder in (self.root, self.jobs_dir, self.adapters_dir, self.reports_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{printable(folder)}: cannot create the home's folder: {exc.strerror or exc}") from None

    def config(self) -> HomeConfig:
        """The operator's settings in ``config.yaml`` (absent: the defaults).

        ``allow_roots: [DIR, ...]`` adds read roots; ``allow_remote_code: true`` lets jobs
        set ``trust_remote_code``; ``limits: {max_row_bytes: N, ...}`` raises or lowers
        the dataset limits (:class:`loraq.data.ReadLimits`). The file is the
        operator's: it is never a symlink, and any other key is an error.
        """
        path = self.config_path
        where = str(path)
        try:
            if path.is_symlink():
                raise SpecError([Problem(where, "is a symlink; loraq reads its home's files only as themselves")])
            if not path.exists():
                return HomeConfig()
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError([Problem(where, f"cannot be read: {getattr(exc, 'strerror', None) or exc}")]) from None
        try:
            data = safeyaml.load(text) or {}
        except YamlProblem as exc:
            raise SpecError([Problem(f"{where}:{exc.line}" if exc.line else where, str(exc))]) from None
        if not isinstance(data, dict) or set(data) - CONFIG_KEYS:
            raise SpecError([Problem(where, f"expected a mapping with only {', '.join(sorted(CONFIG_KEYS))}")])
        roots = data.get("allow_roots") or []
        if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
            raise SpecError([Problem(f"{where}: allow_roots", "expected a list of folders")])
        remote = data.get("allow_remote_code", False)
        if not isinstance(remote, bool):
            raise SpecError([Problem(f"{where}: allow_remote_code", "expected true or false")])
        limits = data.get("limits") or {}
        if not isinstance(limits, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                   and v > 0 for k, v in limits.items()):
            raise SpecError([Problem(f"{where}: limits", "expected a mapping of limit names to positive integers")])
        models = data.get("models") or {}
        if not isinstance(models, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                   for k, v in models.items()):
            raise SpecError([Problem(f"{where}: models", "expected a mapping of model names to folders or hub ids")])
        api_limits = data.get("api") or {}
        if not isinstance(api_limits, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
                for k, v in api_limits.items()) or set(api_limits) - set(API_DEFAULTS):
            raise SpecError([Problem(f"{where}: api", "expected a mapping of "
                                                      f"{', '.join(API_DEFAULTS)} to positive integers")])
        return HomeConfig(allow_roots=tuple(Path(r).expanduser() for r in roots), allow_remote_code=remote,
                          limits=dict(limits), models=dict(models), api={**API_DEFAULTS, **api_limits})

    def model_folder(self, named: str) -> str:
        """A ``models:`` entry of config.yaml as a folder (relative to the home) or, if it is not one, a hub id."""
        if named.startswith(("/", ".", "~")):
            return str((self.root / Path(named).expanduser()).absolute())
        return named

    def allowed_roots(self) -> list[Path]:
        """Roots the operator allowed in ``config.yaml`` (``allow_roots: [DIR, ...]``)."""
        return list(self.config().allow_roots)

    def roots(self, *, queue_dir: Path | None = None, extra: Iterable[Path | str] = ()) -> Roots:
        read: list[Path | str] = [self.root, hf_cache_dir(), *self.allowed_roots(), *extra]
        if queue_dir is not None:
            read.append(queue_dir)
        return Roots.of(read, config=self.config_path)


CONFIG_KEYS = frozenset({"allow_roots", "allow_remote_code", "limits", "models", "api"})
#: The /v1 API's limits (``api:`` in config.yaml): a request body, an upload, requests waiting to generate.
API_DEFAULTS: dict[str, int] = {"max_body_bytes": 1 << 20, "max_upload_bytes": 512 << 20, "generation_queue": 16,
                                "max_tokens": 4096}


@dataclass(frozen=True)
class HomeConfig:
    allow_roots: tuple[Path, ...] = ()
    allow_remote_code: bool = False
    limits: dict[str, int] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # name -> folder or hub id: the bases /v1 offers
    api: dict[str, int] = field(default_factory=lambda: dict(API_DEFAULTS))
