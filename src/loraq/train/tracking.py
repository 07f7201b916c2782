"""Experiment trackers: a job's run in MLflow, TensorBoard, trackio and W&B (``tracking.report_to``).

Each tracker is driven through its library's own API, in the trainer process, while the
job's output goes to its ``train.log`` (the trainer's stdout and stderr are that file during
a job), so what the libraries print lands in the job's log, never on loraq's own output.

* the run: named for the job; tagged with its group (a sweep's name), the sweep's settings
  and the attempt; the job's settings as parameters; the loss curve (``loss``,
  ``eval_loss``, ``learning_rate``, ``grad_norm``) by step; at the end the eval loss and
  every metric of the base and the adapter (``base_rouge_l``, ``rouge_l``, ...).
* a resumed attempt continues the same run: the run ids are written, before the first
  step, to ``jobs/<id>/tracking.json`` beside the attempts' checkpoints, and the next
  attempt opens those runs again (MLflow: the run id; W&B and trackio: ``resume``;
  TensorBoard: the same folder, events after the resumed step purged).
* a tracker that is not installed, or fails, is a warning in the log and in the job's
  result (``extras.tracking.warnings``); the job goes on without it.

Where: MLflow logs to ``tracking.mlflow_uri``, else the environment's ``MLFLOW_TRACKING_URI``
(else ``<home>/mlruns``, MLflow's file store); TensorBoard to ``<home>/<tracking.tensorboard_dir>``
(default ``<home>/tensorboard/<job>``); W&B to its own settings (``WANDB_MODE``, ``WANDB_DIR``,
else the job's folder); trackio to its own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import fsutil
from ..queue.spec import JobSpec, TrackingSpec

RUNS_FILE = "tracking.json"  # in the job's folder: {tracker: run id}


@dataclass
class Context:
    """Who the run is: what the trackers are told about it."""

    job: str
    attempt: int
    group: str | None
    sweep: dict[str, Any]
    params: dict[str, Any]
    job_dir: Path  # jobs/<id>: the run ids live here, across attempts
    home: Path
    resume_step: int | None

    @property
    def tags(self) -> dict[str, str]:
        tags = {"loraq.job": self.job, "loraq.attempt": str(self.attempt)}
        if self.group:
            tags["loraq.group"] = self.group
        tags |= {f"loraq.sweep.{k}": str(v) for k, v in self.sweep.items()}
        return tags


class Tracker:
    """One tracker's run; every method may raise: :class:`Tracking` turns a failure into a warning."""

    name = ""

    def open(self, ctx: Context, run_id: str | None) -> str | None:  # returns the run id to keep
        raise NotImplementedError

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        raise NotImplementedError

    def where(self) -> dict[str, Any]:
        return {}


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, settings: TrackingSpec) -> None:
        self.settings = settings
        self.client: Any = None
        self.run_id = ""
        self.uri = ""

    def open(self, ctx: Context, run_id: str | None) -> str | None:
        from mlflow.tracking import MlflowClient

        self.uri = self.settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (ctx.home / "mlruns").as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - deleted, or another server: a new run, below
                run_id = None
            else:
                self.client.set_tag(run_id, "loraq.attempt", str(ctx.attempt))
                self.run_id = run_id
                return run_id
        found = self.client.get_experiment_by_name(self.settings.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(self.settings.experiment)
        run = self.client.create_run(experiment, tags=ctx.tags, run_name=ctx.job)
        self.run_id = run.info.run_id
        for key, value in ctx.params.items():
            self.client.log_param(self.run_id, key, value)
        return self.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")

    def where(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri}


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, settings: TrackingSpec) -> None:
        self.settings = settings
        self.writer: Any = None
        self.folder: Path | None = None

    def open(self, ctx: Context, run_id: str | None) -> str | None:
        from torch.utils.tensorboard import SummaryWriter

        relative = self.settings.tensorboard_dir or f"tensorboard/{ctx.job}"
        folder = (ctx.home / relative).resolve()
        if not folder.is_relative_to(ctx.home.resolve()):
            raise ValueError(f"tracking.tensorboard_dir {relative!r} leads outside the home")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        # A resumed attempt writes on after its checkpoint's step: what an earlier attempt wrote after it is purged.
        purge = ctx.resume_step + 1 if run_id and ctx.resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge)
        if not run_id:
            self.writer.add_text("loraq/tags", json.dumps(ctx.tags, sort_keys=True), 0)
            self.writer.add_text("loraq/params", json.dumps(ctx.params, sort_keys=True, default=str), 0)
        return str(folder)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()

    def where(self) -> dict[str, Any]:
        return {"dir": str(self.folder)}


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, settings: TrackingSpec, module: str = "wandb") -> None:
        self.settings = settings
        self.module = module
        self.run: Any = None
        self.run_id = ""

    def open(self, ctx: Context, run_id: str | None) -> str | None:
        import secrets

        import wandb

        self.run_id = run_id or secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9] too
        folder = os.environ.get("WANDB_DIR") or str(ctx.job_dir)
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.settings.experiment, entity=self.settings.wandb_entity, name=ctx.job,
                              id=self.run_id, resume="allow", dir=folder, config=ctx.params,
                              tags=[t[:64] for t in (ctx.group, *(f"{k}={v}" for k, v in ctx.sweep.items())) if t],
                              group=ctx.group, reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True))
        self.run.summary["loraq.attempt"] = ctx.attempt
        for key, value in ctx.tags.items():
            self.run.summary[key] = value
        return self.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def where(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "dir": str(getattr(self.run, "dir", ""))}


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, settings: TrackingSpec) -> None:
        self.settings = settings
        self.run: Any = None

    def open(self, ctx: Context, run_id: str | None) -> str | None:
        import trackio  # not a dependency of loraq: missing, it is a warning

        self.run = trackio.init(project=self.settings.experiment, name=ctx.job, config=ctx.params,
                                resume="allow" if run_id else "never")
        return ctx.job

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import trackio

        trackio.log(dict(metrics), step=step)

    def close(self, ok: bool) -> None:
        import trackio

        trackio.finish()


_TRACKERS: dict[str, Callable[[TrackingSpec], Tracker]] = {
    "mlflow": MlflowTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


@dataclass
class Tracking:
    """The trackers of one job's attempt; a tracker that fails is dropped with a warning, never the job."""

    log_line: Callable[[str], None]
    trackers: list[Tracker] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    where: dict[str, Any] = field(default_factory=dict)  # tracker -> its run id, folder, server

    def _warn(self, tracker: Tracker, what: str, exc: BaseException) -> None:
        message = f"tracker {tracker.name}: {what} failed ({type(exc).__name__}: {str(exc)[:300]}); the job goes on without it"
        self.warnings.append(message)
        self.log_line(f"warning: {message}")
        with contextlib.suppress(ValueError):
            self.trackers.remove(tracker)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.log(metrics, step)
            except Exception as exc:  # a tracker's fault is never the job's
                self._warn(tracker, "logging", exc)

    def close(self, ok: bool) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.close(ok)
            except Exception as exc:
                self._warn(tracker, "closing the run", exc)
        self.trackers.clear()

    def summary(self) -> dict[str, Any]:
        """What the job's result says of its runs: where each one is, and the warnings."""
        return self.where | ({"warnings": self.warnings} if self.warnings else {})


def open_runs(spec: JobSpec, *, job_dir: Path, home: Path, attempt: int, sweep: dict[str, Any] | None,
              resume_step: int | None, log: Callable[[str], None]) -> Tracking:
    """Start (or, for a resumed job, continue) the job's runs."""
    tracking = Tracking(log)
    settings = spec.tracking
    if settings is None or not settings.report_to:
        return tracking
    ctx = Context(job=spec.name, attempt=attempt, group=spec.group, sweep=dict(sweep or {}), params=params_of(spec),
                  job_dir=job_dir, home=home, resume_step=resume_step)
    previous = _read_runs(job_dir)
    runs = dict(previous)
    where = tracking.where
    for name in settings.report_to:
        tracker = _TRACKERS[name](settings)
        try:
            run_id = tracker.open(ctx, runs.get(name))
        except ImportError as exc:
            message = f"tracker {name} is not installed ({exc}); the job goes on without it"
            tracking.warnings.append(message)
            log(f"warning: {message}")
            continue
        except Exception as exc:  # a tracker that cannot start is a warning, never a failed job
            tracking.trackers.append(tracker)
            tracking._warn(tracker, "starting the run", exc)
            continue
        tracking.trackers.append(tracker)
        if run_id:
            runs[name] = run_id
        where[name] = tracker.where()
        log(f"tracking: {name} run {run_id} ({'continued' if name in previous else 'started'})")
    with contextlib.suppress(OSError):  # before the first step: a kill from here on resumes these runs
        fsutil.atomic_write_json(job_dir / RUNS_FILE, runs)
    return tracking


def _read_runs(job_dir: Path) -> dict[str, str]:
    try:
        runs = json.loads((job_dir / RUNS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in runs.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(runs, dict) else {}


def params_of(spec: JobSpec) -> dict[str, Any]:
    """The job's settings as flat ``section.key`` parameters (scalars only)."""
    out: dict[str, Any] = {"base_model": spec.base_model, "dataset": spec.dataset.path}
    for section in ("lora", "training"):
        for key, value in getattr(spec, section).model_dump().items():
            if value is not None:
                out[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def _millis() -> int:
    import time

    return int(time.time() * 1000)

