"""Strict JSON for files a bundle holds (the manifest, state headers, output markers): UTF-8, no duplicate keys,
bounded nesting, and typed access whose every failure names the file and the key path as a BundleError."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import BundleError

MAX_DIM = 2**31 - 1  # any size or axis bound in a manifest


def parse_json(raw: bytes | str, where: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, bounded nesting; errors are BundleErrors. (NaN and Infinity, which
    json.dumps writes for such floats in validation reports, are read as floats.)"""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=no_duplicate_keys)  # NaN/Infinity (a report's errors) are read
    except DuplicateKeyError as bad:
        raise BundleError(f"{where} is not valid JSON: {bad}") from None
    except RecursionError:
        raise BundleError(f"{where} is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as bad:  # JSONDecodeError, over-long integers
        raise BundleError(f"{where} is not valid JSON: {bad}") from None


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice (json.loads alone would keep the last one silently)."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads(..., object_pairs_hook=no_duplicate_keys)`: the object, or DuplicateKeyError naming the key."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKeyError(f"key {twice!r} appears twice in one object")
    return data


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


SHA256 = re.compile(r"[0-9a-f]{64}")


class JsonReader:
    """Typed access to parsed JSON; every failure names the file (`where`) and the key path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, expected: str, got: Any) -> BundleError:
        return BundleError(f"{self.where}: {path}: expected {expected}, got {short(got)}")

    def key(self, data: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in data:
            raise BundleError(f"{self.where}: missing key {path + '.' if path else ''}{key}")
        return data[key]

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, "a JSON object", value)
        return value

    def array(self, value: Any, path: str) -> list[Any] | tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise self.fail(path, "a JSON list", value)
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "a non-empty string", value)
        return value

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value or len(value) > 1000 or not value.isprintable():
            raise self.fail(path, "a non-empty printable name", value)
        return value

    def integer(self, value: Any, path: str, low: int = 0, high: int = MAX_DIM) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(path, f"an integer in [{low}, {high}]", value)
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices or not isinstance(value, str):
            raise self.fail(path, f"one of {choices}", value)
        return value

    def fields(self, data: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] | None = ()
               ) -> Mapping[str, Any]:
        """An object with these keys; unknown keys are refused unless `optional` is None (then ignored)."""
        data = self.mapping(data, path)
        for key in required:
            self.key(data, key, path)
        unknown = [] if optional is None else sorted(set(data) - set(required) - set(optional))
        if unknown:
            raise BundleError(f"{self.where}: {path}: unknown keys {unknown}")
        return data

    def sha256(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not SHA256.fullmatch(value):
            raise self.fail(path, "a sha256 (64 lowercase hex digits)", value)
        return value
