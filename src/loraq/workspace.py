"""The home: where loraq keeps its state, checkpoints, adapters and reports.

    loraq.db                      the state
    config.yaml                   operator settings (allow_roots)
    jobs/<id>/attempt-<n>/        checkpoints/, train.log, staging/
    adapters/<name>/              published adapters
    reports/                      queue reports
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import Problem, SpecError
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
        return cls(Path(chosen).expanduser().absolute())

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
            folder.mkdir(parents=True, exist_ok=True)

    def allowed_roots(self) -> list[Path]:
        """Roots the operator allowed in ``config.yaml`` (``allow_roots: [DIR, ...]``)."""
        if not self.config_path.is_file():
            return []
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SpecError([Problem(str(self.config_path), f"not valid YAML: {exc}")]) from exc
        if not isinstance(data, dict) or set(data) - {"allow_roots"}:
            raise SpecError(
                [Problem(str(self.config_path), "expected a mapping with only 'allow_roots'")]
            )
        roots = data.get("allow_roots") or []
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise SpecError([Problem(f"{self.config_path}: allow_roots", "expected a list of folders")])
        return [Path(r).expanduser() for r in roots]

    def roots(self, *, queue_dir: Path | None = None, extra: Iterable[Path | str] = ()) -> Roots:
        read: list[Path | str] = [self.root, hf_cache_dir(), *self.allowed_roots(), *extra]
        if queue_dir is not None:
            read.append(queue_dir)
        return Roots.of(read)
