"""The store of a full-sky survey: one zarr directory holding the partition, the settings and
the inputs' provenance at its root, and one ordinary cwtflow store per patch.

Layout::

    sky.zarr/                 zarr group; attrs: format "cwtflow-survey", format_version,
                              cwtflow_version, partition (SkyPartition.to_dict), settings
                              (SurveySettings.to_dict), inputs (path, kind, size, sha256 of
                              each input file), npatch
      patches/0000.zarr       patch 0: a cwtflow history store (CWT.analyze(store=...)),
      patches/0001.zarr ...   readable with open_history; its 'catalog' group (all sources
                              of the patch, with their owner core) is the patch's completion
                              marker: written last, after the final iteration

A patch without a complete catalog is resumed from its last complete iteration
(``CWT.analyze(resume=True)``); a complete one is skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import zarr

from .errors import StoreError
from .sky import SkyPartition
from .store import has_content, json_value, open_group
from .store_catalog import read_store_catalog
from .version import __version__

__all__ = [
    "SURVEY_FORMAT",
    "complete_patches",
    "create_survey_store",
    "file_provenance",
    "is_survey_store",
    "read_survey_attrs",
]

SURVEY_FORMAT = "cwtflow-survey"
SURVEY_FORMAT_VERSION = 1


def file_provenance(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Absolute path, kind, size and SHA-256 of an input file."""
    path = Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {
        "path": str(path),
        "kind": kind,
        "size": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def is_survey_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the root of a survey store."""
    try:
        root = open_group(Path(path))
    except StoreError:
        return False
    return root is not None and root.attrs.get("format") == SURVEY_FORMAT


def read_survey_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The root attrs of the survey store at ``path`` (`StoreError` if it is none)."""
    path = Path(path).expanduser()
    root = open_group(path)
    if root is None or root.attrs.get("format") != SURVEY_FORMAT:
        raise StoreError(f"{path} is not a cwtflow survey store")
    attrs = dict(root.attrs)
    if attrs.get("format_version") != SURVEY_FORMAT_VERSION:
        raise StoreError(f"{path}: survey format version {attrs.get('format_version')!r}")
    return attrs


def create_survey_store(
    path: Path,
    partition: SkyPartition,
    settings: dict[str, Any],
    inputs: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
) -> bool:
    """Create (or check, to resume) the survey store at ``path``; True when resumed.

    Refuses an existing path unless ``resume`` (same partition, settings and input files)
    or ``overwrite`` (only a survey store is replaced).
    """
    attrs = {
        "format": SURVEY_FORMAT,
        "format_version": SURVEY_FORMAT_VERSION,
        "cwtflow_version": __version__,
        "partition": partition.to_dict(),
        "settings": settings,
        "inputs": inputs,
        "npatch": partition.npatch,
    }
    attrs = json_value(attrs)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory (zarr store)")
    if has_content(path):
        if not is_survey_store(path):
            raise StoreError(f"{path} exists and is not a cwtflow survey store; not touching it")
        if resume:
            old = read_survey_attrs(path)
            for key in ("partition", "settings", "inputs"):
                if old.get(key) != attrs[key]:
                    raise StoreError(
                        f"{path} holds a survey with other {key}; resume needs the same ones"
                    )
            return True
        if not overwrite:
            raise StoreError(f"{path} already exists; use resume or overwrite")
        import shutil

        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    (path / "patches").mkdir()
    root.attrs.update(attrs)
    return False


def complete_patches(path: str | os.PathLike[str], npatch: int) -> list[int]:
    """Indices of the patches whose store holds a complete catalog."""
    done = []
    for index in range(npatch):
        store = Path(path) / "patches" / f"{index:04d}.zarr"
        if has_content(store) and read_store_catalog(store) is not None:
            done.append(index)
    return done
