"""The listing: jobs' status-line fields, read without parsing a spec or a result in Python.

What ``loraq status`` and the dashboard read, through :meth:`.Store.listing`,
:meth:`.Store.changed_since` and :meth:`.Store.groups`. The fields inside the JSON
columns (a sweep's group, the published adapter, the metrics object) are
extracted by SQLite's ``json_extract``; on an SQLite built without JSON functions
the same rows are built in Python. Standard library only.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .dependencies import LISTING_COLUMNS
from .records import STATES

#: The jobs' columns a listing row has, besides those extracted from the JSON ones.
COLUMNS = ("id, name, status, priority, max_retries, attempts, progress_step, progress_total, train_loss, "
           "eval_loss, base_eval_loss, error_kind, error, verdict, seq")


def listing_rows(conn: sqlite3.Connection, clauses: list[str], params: list[Any], *, order: str, group: str | None = None,
                 offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """The listing rows of the jobs matching ``clauses`` (and in ``group``), by ``order``, one page of them."""
    page = f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None else (f" LIMIT -1 OFFSET {int(offset)}" if offset else "")
    grouped = [*clauses, "json_extract(spec, '$.spec.group') = ?"] if group is not None else clauses
    where = ("WHERE " + " AND ".join(grouped)) if grouped else ""
    try:
        found = conn.execute(
            f"SELECT {COLUMNS}, json_extract(result, '$.adapter') AS adapter, "
            f"json_extract(result, '$.metrics') AS metrics_json, "
            f"json_extract(spec, '$.spec.group') AS grp, {LISTING_COLUMNS} FROM jobs {where} ORDER BY {order}{page}",
            [*params, *([group] if group is not None else [])]).fetchall()
        return [dict(r) for r in found]
    except sqlite3.OperationalError as exc:  # an SQLite built without JSON functions: the same, in Python
        if "json_extract" not in str(exc):
            raise
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    out = []
    for r in conn.execute(f"SELECT {COLUMNS}, {LISTING_COLUMNS}, result, spec FROM jobs {where} ORDER BY {order}", params):
        row = {k: r[k] for k in r.keys() if k not in ("result", "spec")}  # noqa: SIM118 (a Row iterates values)
        result = json.loads(r["result"]) if r["result"] else {}
        metrics = result["metrics"] if isinstance(result.get("metrics"), dict) else {}
        row |= {"adapter": result.get("adapter"), "grp": group_of(r["spec"]),
                "metrics_json": json.dumps(metrics) if metrics else None}
        if group is None or row["grp"] == group:
            out.append(row)
    return out[offset:offset + limit] if limit is not None else out[offset:]


def group_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """``group -> {status: count}`` for the jobs of sweeps (``spec.group``), by group name."""
    counted: dict[tuple[str, str], int] = {}
    try:
        for r in conn.execute(
                "SELECT json_extract(spec, '$.spec.group') AS grp, status, COUNT(*) AS n FROM jobs "
                "WHERE json_extract(spec, '$.spec.group') IS NOT NULL GROUP BY grp, status"):
            counted[(str(r["grp"]), str(r["status"]))] = int(r["n"])
    except sqlite3.OperationalError as exc:  # an SQLite built without JSON functions
        if "json_extract" not in str(exc):
            raise
        for r in conn.execute("SELECT spec, status FROM jobs"):
            if (grp := group_of(r["spec"])) is not None:
                counted[(grp, r["status"])] = counted.get((grp, r["status"]), 0) + 1
    out: dict[str, dict[str, int]] = {}
    for (grp, state), n in sorted(counted.items()):
        out.setdefault(grp, {k: 0 for k in STATES})[state] = n
    return out


def group_of(spec_json: str) -> str | None:
    group = (json.loads(spec_json).get("spec") or {}).get("group")
    return None if group is None else str(group)
