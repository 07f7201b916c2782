"""loraq: train many LoRA adapters unattended and safely.

What users may import: the library API (one function per command, each returning
a result object) and the errors it raises. Everything else is internal and may
move between releases. Importing this package never imports torch.

    from loraq import Home, submit, run, status
    home = Home.locate("./.loraq")
    submit("queue.yaml", home=home)
    run(home)
    for job in status(home).jobs: ...
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it. Loaded on first use (PEP 562), so that
#: ``import loraq.queue.store`` stays standard-library only and ``loraq status`` stays fast.
_EXPORTS = {
    **dict.fromkeys(["ChangeResult", "ExportResult", "JobRow", "ReportResult", "RunOptions", "RunResult",
                     "ShowResult", "StatusResult", "SubmitResult", "cancel", "export", "follow_log",
                     "inspect_adapter", "log_path", "pause", "resume", "retry", "run", "show", "status", "submit",
                     "write_demo", "write_report"], ".api"),
    **dict.fromkeys(["CorruptStoreError", "DataError", "ExportError", "FailureKind", "InspectionError", "LeaseLost",
                     "LoraqError", "NotFoundError", "NotInCache", "PathError", "Problem", "ProblemsError", "ProtocolError",
                     "PublishConflict", "RegexTimeout", "SpecError", "StoreError", "StoreFaultError", "TemplateError",
                     "TemplateBudgetError", "ApiError", "BodyTooLarge", "GeneratorBusy",
                     "TrainerStartError", "TrainingError", "TransitionError", "UsageError", "YamlProblem"], ".errors"),
    "Home": ".workspace",
}

if TYPE_CHECKING:
    from .api import (
        ChangeResult,
        ExportResult,
        JobRow,
        ReportResult,
        RunOptions,
        RunResult,
        ShowResult,
        StatusResult,
        SubmitResult,
        cancel,
        export,
        follow_log,
        inspect_adapter,
        log_path,
        pause,
        resume,
        retry,
        run,
        show,
        status,
        submit,
        write_demo,
        write_report,
    )
    from .errors import (
        ApiError,
        BodyTooLarge,
        CorruptStoreError,
        DataError,
        ExportError,
        FailureKind,
        GeneratorBusy,
        InspectionError,
        LeaseLost,
        LoraqError,
        NotFoundError,
        NotInCache,
        PathError,
        Problem,
        ProblemsError,
        ProtocolError,
        PublishConflict,
        RegexTimeout,
        SpecError,
        StoreError,
        StoreFaultError,
        TemplateBudgetError,
        TemplateError,
        TrainerStartError,
        TrainingError,
        TransitionError,
        UsageError,
        YamlProblem,
    )
    from .workspace import Home


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraq' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [  # noqa: F822 (resolved lazily by __getattr__)
    "ApiError", "BodyTooLarge", "ChangeResult", "CorruptStoreError", "DataError", "ExportError", "ExportResult",
    "FailureKind", "GeneratorBusy", "Home",
    "InspectionError", "JobRow", "LeaseLost", "LoraqError", "NotFoundError", "NotInCache", "PathError", "Problem", "ProblemsError",
    "ProtocolError", "PublishConflict", "RegexTimeout", "ReportResult", "RunOptions", "RunResult", "ShowResult",
    "SpecError", "StatusResult", "StoreError", "StoreFaultError", "SubmitResult", "TemplateBudgetError", "TemplateError",
    "TrainerStartError", "TrainingError", "TransitionError", "UsageError", "YamlProblem", "__version__", "cancel",
    "export", "follow_log", "inspect_adapter", "log_path", "pause", "resume", "retry", "run", "show", "status",
    "submit", "write_demo", "write_report",
]
