"""One error hierarchy for the toolkit; every message names the file / graph / input at fault."""
from __future__ import annotations


class MirasolError(Exception):
    """Base of every error this toolkit raises on purpose."""


class BundleError(MirasolError):
    """A bundle directory, manifest, graph file or state file is missing, malformed or untrusted."""


class InputError(MirasolError, ValueError):
    """An input given to the runtime does not fit what the graph expects."""


class BackendError(MirasolError):
    """A backend could not load or run a graph."""


class ExportError(MirasolError):
    """Export, validation or calibration failed."""


class OutputError(MirasolError):
    """An output path is refused (it holds something mirasol did not write) or cannot be written."""
