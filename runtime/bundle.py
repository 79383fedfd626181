"""A bundle on disk: its manifest, checked files and tokenizer."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import BundleError
from .manifest import GraphEntry, Manifest
from .tokenizer import ByteTokenizer


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A bundle directory, loaded and checked: names stay inside it, files exist and match their checksums."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.tokenizer = ByteTokenizer.from_dict(manifest.tokenizer)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read `path`/manifest.json; with `verify`, check every graph file's sha256 (off: faster start)."""
        directory = Path(path)
        manifest = Manifest.read(directory)
        bundle = cls(directory.resolve(), manifest)
        for graph in manifest.graphs.values():
            graph_path = bundle.file(graph.file)
            for extra in graph.external_data:
                bundle.file(extra)
            if verify:
                actual = sha256_file(graph_path)
                if actual != graph.sha256:
                    raise BundleError(f"{graph_path}: checksum {actual[:12]}… does not match the manifest's "
                                      f"{graph.sha256[:12]}… (file altered or truncated); re-export the bundle")
        return bundle

    def file(self, name: str) -> Path:
        """The path of a file the manifest names; refused if it is missing or resolves outside the bundle."""
        path = (self.path / name).resolve()
        if path.parent != self.path:
            raise BundleError(f"{self.path}: {name!r} resolves to {path}, outside the bundle directory")
        if not path.is_file():
            raise BundleError(f"{self.path}: file {name!r} named in the manifest is missing")
        return path

    @property
    def graphs(self) -> dict[str, GraphEntry]:
        return self.manifest.graphs

    @property
    def config(self) -> dict:
        return self.manifest.config

    @property
    def fingerprint(self) -> str:
        """Identifies the bundle's graphs (for state files): a hash of their checksums."""
        text = ",".join(f"{name}:{g.sha256}" for name, g in sorted(self.graphs.items()))
        return hashlib.sha256(text.encode()).hexdigest()
