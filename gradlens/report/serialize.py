"""Machine output: the reports as JSON (schemas ``gradlens.compare/3`` and ``gradlens.sweep/2``)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from gradlens.results import CompareReport
from gradlens.sweep.results import SweepReport

REPORTS = ("compare", "sweep")


def to_json(report: BaseModel) -> str:
    """Indented JSON; non-finite floats are already null in the report models."""
    return report.model_dump_json(indent=2)


def json_schema(report: str = "compare") -> str:
    """The JSON Schema of a report, generated from its models themselves.

    ``compare``: `CompareReport` (``gradlens compare --format json``); ``sweep``: `SweepReport`
    (``gradlens sweep --format summary``). Its ``$id`` is the report's ``schema_version``.
    """
    model: type[BaseModel]
    if report == "compare":
        model = CompareReport
    elif report == "sweep":
        model = SweepReport
    else:
        raise ValueError(f"unknown report {report!r}; expected one of {', '.join(REPORTS)}")
    schema = model.model_json_schema()
    schema["$id"] = model.model_fields["schema_version"].default
    return json.dumps(schema, indent=2, ensure_ascii=False)
