"""Reading the JSON files of a checkpoint folder with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file if it is not valid JSON or not an
    object (a missing or unreadable file raises OSError as usual)."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError from the read
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


__all__ = ["read_json_object"]
