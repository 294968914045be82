"""Machine output: the report as JSON (schema ``gradlens.compare/1``)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from gradlens.results import CompareReport


def to_json(report: BaseModel) -> str:
    """Indented JSON; non-finite floats are already null in the report models."""
    return report.model_dump_json(indent=2)


def json_schema() -> str:
    """The JSON Schema of `CompareReport`, generated from the models themselves."""
    schema = CompareReport.model_json_schema()
    schema["$id"] = "gradlens.compare/1"
    return json.dumps(schema, indent=2, ensure_ascii=False)
