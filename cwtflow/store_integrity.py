"""Integrity of a run's zarr store: checksummed chunks, the manifest of each complete group,
attrs digests, pinned reads and `verify_store`.

Every array is written with the CRC32C codec after its compressor (`CHUNK_CODECS`), and with
empty chunks written too (`WRITE_OPTIONS`), so every chunk of the grid exists as a file whose
last 4 bytes are the CRC32C of the rest: a missing chunk is an error, never the fill value.

When a group is marked complete (`seal_group`), one metadata write adds the marker, its
*manifest* and a digest of its attrs. The manifest lists, per array, the shape, chunk shape,
dtype, a digest of the array's ``zarr.json`` and the CRC32C of every chunk in grid order (the
chunk files' last 4 bytes), so a chunk moved to another place of the grid is caught even
though its own checksum is valid. The attrs digest (blake2b of the attrs as JSON, the digest
left out) covers the iteration's statistics, its table and the manifest itself; the root attrs
carry one too (`update_root`), renewed on every update by the writer.

Checks (`check_group`): the presence check (on every open: attrs digest, manifest, array
metadata, every chunk file listed) reads no chunk; the full check (on resume, and by
`verify_store`) also reads every chunk and checks both CRCs. Readers read chunks through a
`PinnedStore`, which checks each chunk against the manifest of the group *as it was opened*:
a chunk of a group pruned or replaced by a writer since then raises a `StoreError` telling to
reopen, a damaged one a `StoreError` naming group, array and chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import google_crc32c
import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

from .errors import StoreError
from .store import COMPLETE, check_root, complete_iterations, group_name, is_complete, open_group
from .store_lock import read_lock

__all__ = [
    "CHUNK_CODECS",
    "DIGEST",
    "MANIFEST",
    "WRITE_OPTIONS",
    "PinnedStore",
    "VerifyReport",
    "attrs_digest",
    "block_digests",
    "check_group",
    "check_root_digest",
    "checksummed",
    "combine_digests",
    "group_digest",
    "open_pinned",
    "seal_group",
    "update_root",
    "verify_store",
]

#: Bytes-to-bytes codecs of every stored array: blosc (lz4 on byte-shuffled values), then the
#: CRC32C of the compressed bytes. Chosen by `benchmarks/bench_codecs.py`: on a CWT state it
#: stores 0.60 of the raw bytes (zstd level 0: 0.66) and writes and reads it in 0.56 of zstd's
#: time (one thread, 2048^2, 512-pixel chunks).
CHUNK_CODECS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec())
#: ``to_zarr`` options of every write: all chunks are stored, even those equal to the fill.
WRITE_OPTIONS = {"write_empty_chunks": True}
#: Group attr holding the manifest of a complete group.
MANIFEST = "cwtflow_manifest"
#: Attr holding the digest of the other attrs (root and complete groups).
DIGEST = "cwtflow_digest"


def checksummed(encoding: dict[str, dict[str, Any]], names: Iterable[str]) -> dict[str, dict]:
    """``encoding`` with the checksummed codecs set for every variable of ``names``."""
    out = {name: dict(encoding.get(name, {})) for name in names}
    for enc in out.values():
        enc["compressors"] = CHUNK_CODECS
    return out


# --- digests --------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def attrs_digest(attrs: dict[str, Any]) -> str:
    """blake2b of ``attrs`` (as JSON, the `DIGEST` entry left out)."""
    body = {k: v for k, v in attrs.items() if k != DIGEST}
    return "blake2b:" + hashlib.blake2b(_canonical(body), digest_size=16).hexdigest()


def _block_digest(block: np.ndarray) -> str:
    block = np.ascontiguousarray(block, dtype=np.float64)
    return hashlib.blake2b(memoryview(block).cast("B"), digest_size=16).hexdigest()


def block_digests(array: Any, chunks: tuple[int, int]) -> list[Any]:
    """Digest of the values of every (cy, cx) block of a 2-D array, row-major (the input
    checksums); delayed for dask arrays."""
    if isinstance(array, np.ndarray):
        ny, nx = array.shape
        return [
            _block_digest(array[y : y + chunks[0], x : x + chunks[1]])
            for y in range(0, ny, chunks[0])
            for x in range(0, nx, chunks[1])
        ]
    blocks = array.rechunk(chunks).to_delayed().ravel()
    return [dask.delayed(_block_digest, pure=True)(b) for b in blocks]


def combine_digests(shape: Sequence[int], digests: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([list(shape), "float64"]).encode())
    for d in digests:
        h.update(d.encode())
    return "blake2b:" + h.hexdigest()


# --- root attrs -----------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        text = file.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {file}: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise StoreError(f"corrupted store: {file} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise StoreError(f"corrupted store: {file} is not a zarr metadata document")
    return doc


def update_root(path: Path, changes: dict[str, Any], *, create: bool = False) -> None:
    """Update the root attrs with ``changes`` and renew their digest (one metadata write);
    ``create``: make the root group with these attrs."""
    import zarr

    if create:
        zarr.open_group(str(path), mode="a", attributes={})
    root = zarr.open_group(str(path), mode="r+")
    attrs = {**dict(root.attrs), **json.loads(json.dumps(changes))}
    attrs[DIGEST] = attrs_digest(attrs)
    root.attrs.put(attrs)


def check_root_digest(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse root attrs edited since the writer last wrote them."""
    if attrs.get(DIGEST) != attrs_digest(attrs):
        raise StoreError(
            f"{path}: corrupted store, the root attrs were changed after they were written "
            "(digest mismatch)"
        )


# --- manifest -------------------------------------------------------------------------------


def _grid(meta: dict[str, Any]) -> tuple[tuple[int, ...], str, bool]:
    """Chunk grid shape, key separator and whether keys start with ``c`` (zarr v3 default
    chunk key encoding) of an array's metadata."""
    shape = meta["shape"]
    chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    grid = tuple(-(-int(s) // int(c)) for s, c in zip(shape, chunk_shape, strict=True))
    encoding = meta.get("chunk_key_encoding", {})
    sep = encoding.get("configuration", {}).get("separator", "/")
    return grid, sep, encoding.get("name", "default") == "default"


def _chunk_keys(meta: dict[str, Any]) -> list[str]:
    """The chunk keys of an array in grid (C) order."""
    grid, sep, prefix = _grid(meta)
    keys = []
    for idx in np.ndindex(*grid):
        parts = [str(i) for i in idx]
        keys.append(sep.join(["c", *parts]) if prefix else sep.join(parts or ["0"]))
    return keys


def _chunk_index(grid: tuple[tuple[int, ...], str, bool], key: str) -> int | None:
    """Position of chunk ``key`` in grid order; None when it is not a chunk of the grid."""
    shape, sep, prefix = grid
    parts = key.split(sep)
    if prefix:
        if parts[0] != "c":
            return None
        parts = parts[1:]
    try:
        idx = tuple(int(p) for p in parts) if shape else ()
        return int(np.ravel_multi_index(idx, shape)) if shape else 0
    except ValueError:
        return None


def _array_names(directory: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_dir() and (entry / "zarr.json").is_file()
    )


def _manifest_entry(directory: Path, name: str) -> dict[str, Any]:
    meta = _read_json(directory / name / "zarr.json") or {}
    keys = _chunk_keys(meta)
    crcs = []
    for key in keys:
        try:
            with open(directory / name / key, "rb") as f:
                f.seek(-4, os.SEEK_END)
                crcs.append(f.read(4).hex())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{directory}: chunk {key} of '{name}' was not written: {exc}"
            ) from None
    return {
        "shape": meta["shape"],
        "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"],
        "dtype": meta["data_type"],
        "metadata": hashlib.blake2b(_canonical(meta), digest_size=16).hexdigest(),
        "crc32c": "".join(crcs),
    }


def seal_group(path: Path, name: str, attrs: dict[str, Any]) -> None:
    """Mark group ``name`` complete: ``attrs``, its manifest, the marker and the attrs digest,
    in one metadata write, after all its chunks are stored."""
    import zarr

    directory = path / name
    manifest = {array: _manifest_entry(directory, array) for array in _array_names(directory)}
    group = zarr.open_group(str(path), path=name, mode="r+")
    new = {**dict(group.attrs), **json.loads(json.dumps(attrs))}
    new.update({MANIFEST: manifest, COMPLETE: True})
    new[DIGEST] = attrs_digest(new)
    group.attrs.put(new)


def _pruned(path: Path, name: str) -> StoreError:
    what = f"iteration {int(name.rsplit('/', 1)[1])}" if name.startswith("iterations/") else name
    return StoreError(
        f"{path}: {what} was pruned or replaced by the writer after this history was opened; "
        "reopen it (open_history)"
    )


def _group_attrs(path: Path, name: str) -> dict[str, Any] | None:
    """Attrs of a complete group ``name`` (read from its zarr.json), None when not complete."""
    doc = _read_json(path / name / "zarr.json")
    if doc is None:
        return None
    attrs = doc.get("attributes", {})
    return attrs if isinstance(attrs, dict) and attrs.get(COMPLETE) is True else None


def group_digest(path: Path, name: str) -> str:
    """The attrs digest of complete group ``name`` as it is now (unchecked)."""
    attrs = _group_attrs(path, name)
    if attrs is None:
        raise _pruned(path, name)
    return str(attrs.get(DIGEST))


def _check_chunk(where: str, key: str, data: bytes, expected: str) -> None:
    if len(data) < 4:
        raise StoreError(f"{where}: chunk {key} is truncated ({len(data)} bytes)")
    payload, tail = data[:-4], data[-4:]
    if google_crc32c.value(payload).to_bytes(4, "little") != tail:
        raise StoreError(f"{where}: chunk {key} fails its CRC32C checksum (damaged or truncated)")
    if tail.hex() != expected:
        raise StoreError(
            f"{where}: chunk {key} is not the chunk the manifest lists there (moved or replaced)"
        )


def check_group(path: Path, name: str, *, full: bool = False) -> str:
    """Check complete group ``name`` against its manifest; returns its attrs digest.

    Presence (always): attrs digest, manifest, each array's metadata, every chunk file there.
    ``full``: also every chunk's CRC32C, against its bytes and against the manifest.
    """
    attrs = _group_attrs(path, name)
    if attrs is None:
        raise _pruned(path, name)
    where = f"{path}: corrupted store, group '{name}'"
    if attrs.get(DIGEST) != attrs_digest(attrs):
        raise StoreError(f"{where}: its attrs were changed after it was completed (digest)")
    manifest = attrs.get(MANIFEST)
    if not isinstance(manifest, dict):
        raise StoreError(f"{where} is marked complete without a manifest")
    directory = path / name
    for array, entry in manifest.items():
        here = f"{path}: corrupted store, array '{name}/{array}'"
        meta = _read_json(directory / array / "zarr.json")
        if meta is None:
            raise StoreError(f"{here} is missing")
        for key, got in (("shape", meta.get("shape")), ("dtype", meta.get("data_type"))):
            if got != entry.get(key):
                raise StoreError(f"{here} has {key} {got!r}, the manifest {entry.get(key)!r}")
        digest = hashlib.blake2b(_canonical(meta), digest_size=16).hexdigest()
        if digest != entry.get("metadata"):
            raise StoreError(f"{here}: its zarr.json differs from the manifest's")
        try:
            keys = _chunk_keys(meta)
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{here}: unreadable chunk grid") from None
        crcs = entry.get("crc32c", "")
        if len(crcs) != 8 * len(keys):
            raise StoreError(f"{here}: the manifest lists {len(crcs) // 8} chunks")
        present = _files(directory / array)
        for i, key in enumerate(keys):
            if key not in present:
                raise StoreError(f"{here}: chunk {key} is missing")
            if full:
                try:
                    data = (directory / array / key).read_bytes()
                except OSError as exc:
                    raise StoreError(f"{here}: chunk {key} unreadable: {exc}") from None
                _check_chunk(here, key, data, crcs[8 * i : 8 * i + 8])
    return str(attrs[DIGEST])


def _files(directory: Path) -> set[str]:
    out = set()
    for root, _, files in os.walk(directory):
        rel = Path(root).relative_to(directory).as_posix()
        out.update(f if rel == "." else f"{rel}/{f}" for f in files)
    return out


# --- pinned reads ---------------------------------------------------------------------------


class PinnedStore(LocalStore):
    """Read-only store of one complete group as opened: each chunk read is checked against
    the manifest of the group with the attrs digest it had then (see the module doc)."""

    def __init__(self, path: Path, name: str, digest: str) -> None:
        super().__init__(path / name, read_only=True)
        self.store_path, self.name, self.digest = path, name, digest
        self._manifest: dict[str, Any] | None = None
        self._grids: dict[str, tuple[tuple[int, ...], str, bool]] = {}

    def with_read_only(self, read_only: bool = False) -> PinnedStore:
        if not read_only:
            raise StoreError(f"{self.store_path}: a pinned group is read-only")
        return PinnedStore(self.store_path, self.name, self.digest)

    def _current_manifest(self) -> dict[str, Any] | None:
        """The group's manifest if it is still the pinned group, else None."""
        attrs = _group_attrs(self.store_path, self.name)
        if attrs is None or attrs.get(DIGEST) != self.digest:
            return None
        return attrs.get(MANIFEST)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        value = await super().get(key, prototype, byte_range)
        array, sep, chunk = key.partition("/")
        if not sep or chunk == "zarr.json" or byte_range is not None:
            return value
        if self._manifest is None:
            self._manifest = self._current_manifest()
            if self._manifest is None:
                raise _pruned(self.store_path, self.name)
        here = f"{self.store_path}: corrupted store, array '{self.name}/{array}'"
        entry = self._manifest.get(array)
        if entry is None:
            raise StoreError(f"{here} is not in the group's manifest")
        if array not in self._grids:
            meta = _read_json(self.root / array / "zarr.json")
            if meta is None:
                raise _pruned(self.store_path, self.name)
            self._grids[array] = _grid(meta)
        i = _chunk_index(self._grids[array], chunk)
        if i is None:
            raise StoreError(f"{here}: chunk {chunk} is outside its grid")
        if value is None:
            if self._current_manifest() is None:
                raise _pruned(self.store_path, self.name)
            raise StoreError(f"{here}: chunk {chunk} is missing")
        try:
            _check_chunk(here, chunk, value.to_bytes(), entry["crc32c"][8 * i : 8 * i + 8])
        except StoreError:
            if self._current_manifest() is None:
                raise _pruned(self.store_path, self.name) from None
            raise
        return value


def open_pinned(path: Path, name: str, digest: str) -> xr.Dataset:
    """Complete group ``name`` (checked by `check_group`, which gave ``digest``) as a lazy
    Dataset whose chunk reads go through a `PinnedStore`."""
    try:
        return xr.open_zarr(PinnedStore(path, name, digest), consolidated=False, chunks={})
    except StoreError:
        raise
    except Exception as exc:  # zarr/xarray raise many types on damaged metadata
        raise StoreError(f"{path}: corrupted store, cannot open group '{name}': {exc}") from None


# --- verify ---------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What `verify_store` checked (everything it lists is intact)."""

    path: Path
    groups: list[str] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0
    lock: str | None = None

    def summary(self) -> str:
        locked = f"; locked by {self.lock}" if self.lock else ""
        return (
            f"{self.path}: intact: {len(self.groups)} complete groups ({', '.join(self.groups)}), "
            f"{self.arrays} arrays, {self.chunks} chunks, {self.bytes} bytes checked{locked}"
        )


def verify_store(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a whole store: root attrs (content and digest), then every complete group
    (inputs, iterations, catalog) fully against its manifest (every chunk read and checked).

    Returns a `VerifyReport`; raises `StoreError` naming the first damage found (group, array
    and chunk). Groups not marked complete (a killed writer's leftovers) are not checked.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise StoreError(f"{path} is not a zarr store directory")
    root = open_group(path)
    if root is None:
        raise StoreError(f"{path} is not a zarr store")
    attrs = dict(root.attrs)
    check_root(path, attrs)
    check_root_digest(path, attrs)
    owner = read_lock(path)
    report = VerifyReport(path, lock=owner.describe() if owner else None)
    if not is_complete(open_group(path, "inputs")):
        raise StoreError(f"{path} holds no complete inputs")
    names = ["inputs", *(group_name(k) for k in complete_iterations(path))]
    if is_complete(open_group(path, "catalog")):
        names.append("catalog")
    for name in names:
        check_group(path, name, full=True)
        manifest = (_group_attrs(path, name) or {}).get(MANIFEST, {})
        report.groups.append(name)
        report.arrays += len(manifest)
        for array, entry in manifest.items():
            report.chunks += len(entry["crc32c"]) // 8
            report.bytes += sum(
                f.stat().st_size for f in (path / name / array).rglob("*") if f.is_file()
            )
    return report
