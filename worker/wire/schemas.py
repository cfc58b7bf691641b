"""The JSON Schemas of the wire formats, generated from the models.

``batch-worker schemas --write`` regenerates the files in ``worker/wire/schemas/``;
``batch-worker schemas --check`` (and a test) fails when they drift from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
)

from worker.wire.event_models import CommandEvent, JobEvent
from worker.wire.job_requests import JobRequest

SCHEMA_DIR = Path(__file__).parent / "schemas"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# ------------------------------------------------------------------------------------------
# JSON Schemas, generated from the models above
# ------------------------------------------------------------------------------------------

_SCHEMA_MODELS: dict[str, tuple[type[BaseModel], Literal["validation", "serialization"]]] = {
    "job-request.schema.json": (JobRequest, "validation"),
    "job-event.schema.json": (JobEvent, "serialization"),
    "command-event.schema.json": (CommandEvent, "serialization"),
}


def schema_documents() -> dict[str, str]:
    """File name → JSON Schema text, exactly as it belongs in ``worker/wire/schemas/``."""
    documents = {}
    for name, (model, mode) in _SCHEMA_MODELS.items():
        schema = {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(mode=mode)}
        documents[name] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return documents


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_documents().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files missing or differing from the models."""
    stale = []
    for name, text in schema_documents().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale
