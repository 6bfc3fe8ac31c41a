"""JSON Schemas of transaction and verdict and the Avro schema of the transactions topic.

They are generated from the code (`python -m detector schemas`) and a test checks that the
files in schemas/ match, so the documents cannot drift from what the detector accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from detector.transaction import VERDICT_FIELDS, Transaction

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
BASE_ID = "https://github.com/pubsub-fraud-detector/schemas/"

_REASON = {
    "type": "object",
    "required": ["rule", "action", "description"],
    "properties": {
        "rule": {"type": "string"},
        "action": {"enum": ["block", "review", "allow"]},
        "description": {"type": "string"},
        "shadow": {"type": "boolean"},
        "values": {"type": "object"},
    },
}

_VERDICT_FIELDS: dict[str, Any] = {
    "transaction_id": {"type": "string", "minLength": 1},
    "is_fraud": {"type": "boolean", "description": "True exactly when decision is block."},
    "decision": {"enum": ["allow", "review", "block"]},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "reasons": {
        "type": "array",
        "items": _REASON,
        "description": "Every rule that fired, most severe first.",
    },
    "rules_version": {"type": "string"},
    "message_id": {"type": ["string", "null"]},
    "decided_at": {"type": "string", "format": "date-time"},
    "model_version": {"type": "string"},
    "score_factors": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["feature", "value", "contribution"],
            "properties": {
                "feature": {"type": "string"},
                "value": {"type": "number"},
                "contribution": {"type": "number"},
            },
        },
    },
}


def transaction_json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a transaction message."""
    schema = Transaction.model_json_schema()
    schema.pop("description", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": BASE_ID + "transaction.schema.json",
        "title": "Transaction",
        "description": "A payment transaction published to the transactions topic. "
        "Fields not listed here are accepted and echoed in the verdict.",
        "type": "object",
        "required": schema["required"],
        "properties": schema["properties"],
        "additionalProperties": True,
        "not": {"anyOf": [{"required": [name]} for name in sorted(VERDICT_FIELDS)]},
    }


def verdict_json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of a verdict: the transaction's fields plus the decision."""
    transaction = transaction_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": BASE_ID + "verdict.schema.json",
        "title": "Verdict",
        "description": "The decision on one transaction, published to the results topic and "
        "returned by the HTTP function.",
        "type": "object",
        "required": [
            *transaction["required"],
            "transaction_id",
            "is_fraud",
            "decision",
            "score",
            "reasons",
            "rules_version",
            "message_id",
            "decided_at",
        ],
        "properties": {**transaction["properties"], **_VERDICT_FIELDS},
        "additionalProperties": True,
    }


def transaction_avro_schema() -> dict[str, Any]:
    """Avro schema for the transactions topic (Pub/Sub schema, JSON encoding).

    Avro's JSON encoding needs every field present and optional values wrapped as
    {"string": "..."}; the detector unwraps them (see `transaction.unwrap_avro_json`).
    """
    fields: list[dict[str, Any]] = [
        {"name": "amount", "type": "double"},
        {"name": "customer_id", "type": "string"},
    ]
    for name in Transaction.model_fields:
        if name not in ("amount", "customer_id"):
            fields.append({"name": name, "type": ["null", "string"], "default": None})
    return {
        "type": "record",
        "name": "Transaction",
        "namespace": "fraud.detector",
        "doc": 'A payment transaction (Avro JSON encoding: optional values as {"string": v}).',
        "fields": fields,
    }


def documents() -> dict[str, bytes]:
    """Every schema file, by name, as it should be in schemas/."""
    pretty = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
    return {
        "transaction.schema.json": orjson.dumps(transaction_json_schema(), option=pretty),
        "verdict.schema.json": orjson.dumps(verdict_json_schema(), option=pretty),
        "transaction.avsc": orjson.dumps(transaction_avro_schema(), option=pretty),
    }


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in documents().items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing or differ from the code."""
    return [
        name
        for name, content in documents().items()
        if not (directory / name).exists() or (directory / name).read_bytes() != content
    ]
