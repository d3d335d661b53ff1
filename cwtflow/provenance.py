"""Provenance of the files cwtflow writes: when, from which inputs (with their sha256) and by
which command and package versions.

One record, a JSON-ready dict, goes into every result: FITS states and maps (primary header
cards and the JSON card ``CWTPROV``), the zarr store (root attr ``provenance``) and catalogs
(table meta ``PROVENANCE``, as JSON).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shlex
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .version import __version__

__all__ = ["PACKAGES", "add_fits_cards", "file_sha256", "package_versions", "provenance"]

#: Packages whose versions a provenance record lists (cwtflow first).
PACKAGES = ("cwtflow", "numpy", "dask", "xarray", "zarr", "astropy")


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 hex digest of a file's bytes; None for a directory (a zarr store)."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """{package: version} of `PACKAGES` (``"unknown"`` when not installed as a distribution)."""
    out = {"cwtflow": __version__}
    for name in PACKAGES[1:]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def provenance(
    inputs: Iterable[str | os.PathLike[str]] = (), command: Sequence[str] | None = None
) -> dict[str, Any]:
    """A provenance record: ``date`` (UTC, ISO 8601), ``command`` (the command line, or None
    for an API call), ``inputs`` ([{"path", "sha256"}]; sha256 None for a directory) and
    ``versions`` (`package_versions`)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return {
        "date": now.isoformat(),
        "command": None if command is None else shlex.join(str(c) for c in command),
        "inputs": [{"path": str(p), "sha256": file_sha256(p)} for p in inputs],
        "versions": package_versions(),
    }


def add_fits_cards(header: Any, record: dict[str, Any]) -> None:
    """Put a provenance ``record`` into a FITS ``header``: ``DATE``, ``CREATOR``, the command
    line as ``HISTORY``, ``INPUTn``/``SHA256_n`` per input file and the whole record as the JSON
    card ``CWTPROV`` (the source a program should read)."""
    header["DATE"] = (record["date"], "file written (UTC)")
    header["CREATOR"] = (f"cwtflow {record['versions']['cwtflow']}", "software")
    for i, item in enumerate(record["inputs"], start=1):
        header[f"INPUT{i}"] = (Path(item["path"]).name, "input file")
        if item["sha256"]:
            header[f"SHA256_{i}"] = item["sha256"]
    if record["command"]:
        header.add_history(f"command: {record['command']}")
    header["CWTPROV"] = (json.dumps(record, separators=(",", ":")), "provenance (JSON)")
