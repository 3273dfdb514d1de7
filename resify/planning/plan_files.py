"""Beside the pipeline: reading a saved plan (a Plan, its dict, a plan JSON file, or a conversion
folder written by ``resify.save``) and checking the conversion file's schema version.

``resify.apply(model, plan=...)`` and ``resify.load`` read plans through here; the plan's own schema
is checked by ``Plan.from_dict``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import PlanError
from .sites import Plan

__all__ = ["CONVERSION_FILE", "FILE_SCHEMA_VERSION", "read_plan", "check_file_version"]

#: The conversion's JSON document, in the folder given to ``resify.save``.
CONVERSION_FILE = "resify.json"
#: 1: the first; a document of a newer version is refused with the version it needs.
FILE_SCHEMA_VERSION = 1


def read_plan(plan: Plan | Mapping[str, Any] | str | os.PathLike[str]) -> Plan:
    """A Plan from a Plan, its ``to_dict()``, a plan JSON file, or a folder ``save`` wrote.

    Raises:
        PlanError: the document is not a plan, or of a schema this resify cannot read.
    """
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        doc = plan.get("plan", plan)
        return Plan.from_dict(doc if isinstance(doc, Mapping) else plan)
    path = Path(plan)
    if path.is_dir():
        path = path / CONVERSION_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"cannot read the plan '{path}': {e.strerror or e}; pass a plan JSON file or a folder") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"expected a plan in JSON at '{path}', found invalid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(doc, dict):
        raise PlanError(f"expected a plan (a JSON object) at '{path}', found {type(doc).__name__}")
    if "plan" in doc:
        check_file_version(doc, path)
        doc = doc["plan"]
    return Plan.from_dict(doc)


def check_file_version(doc: Mapping[str, Any], path: Path) -> None:
    """Refuse a conversion file without a schema version, or of a newer one than this resify reads."""
    version = doc.get("file_schema_version")
    if not isinstance(version, int) or version < 1:
        raise PlanError(f"expected a resify conversion file at '{path}', found no file_schema_version")
    if version > FILE_SCHEMA_VERSION:
        raise PlanError(
            f"'{path}' is a resify conversion of file_schema_version {version}, written by a newer resify "
            f"(this one reads up to {FILE_SCHEMA_VERSION}); upgrade resify (it was written by resify "
            f"{doc.get('resify_version', '?')})"
        )
