"""Request bodies checked at the door: JSON without NaN, known fields only, numbers finite and within bounds.

Every refusal is a `RequestError` with the HTTP status that says whose fault it is (4xx: the client's) and a
message that names the field and what it takes; the app turns it into a JSON body.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any


class RequestError(Exception):
    """A request the service refuses: `status` (4xx for the client's mistakes, 5xx for ours) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _no_constant(name: str) -> None:
    raise RequestError(400, f"the body holds {name}, which JSON does not have: send a finite number")


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from `body` (NaN and Infinity refused)."""
    try:
        data = json.loads(body.decode("utf-8") if body else "{}", parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def known(data: dict[str, Any], allowed: Iterable[str], what: str) -> None:
    """Refuse fields outside `allowed` (a typo would otherwise be silently ignored)."""
    allowed = set(allowed)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RequestError(400, f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(sorted(allowed))}")


def text(data: dict[str, Any], name: str, max_chars: int, default: str | None = None, required: bool = False
         ) -> str | None:
    value = data.get(name, default)
    if value is None:
        if required:
            raise RequestError(400, f"{name!r} is required")
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"{name!r} must be a string, got {type(value).__name__}")
    if not value.strip() and required:
        raise RequestError(400, f"{name!r} is empty")
    if len(value) > max_chars:
        raise RequestError(413, f"{name!r} is {len(value)} characters; the most is {max_chars}")
    return value


def number(data: dict[str, Any], name: str, low: float, high: float, default: Any = None, integer: bool = False
           ) -> Any:
    """A finite number in [low, high] (an int when `integer`), or `default` when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(400, f"{name!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(400, f"{name!r} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name!r} must be true or false, got {value!r}")
    return value


def generation(data: dict[str, Any], max_new_tokens: int | None) -> dict[str, Any]:
    """Stream.ask's options from a body (max_new_tokens, temperature, top_k, top_p, seed); `max_new_tokens` when
    the body does not say (None: the bundle's default, or what the question leaves)."""
    return {"max_new_tokens": number(data, "max_new_tokens", 1, 4096, max_new_tokens, integer=True),
            "temperature": number(data, "temperature", 0.0, 100.0, 0.0),
            "top_k": number(data, "top_k", 0, 1_000_000, 0, integer=True),
            "top_p": number(data, "top_p", 0.0, 1.0, 1.0),
            "seed": number(data, "seed", 0, 2**63 - 1, None, integer=True)}


GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
