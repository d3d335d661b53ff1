"""One all-sky catalog and all-sky images out of the patches of a survey store.

Merge rule (deterministic, ``docs/fullsky.md``): every detection of every patch is ranked

0. *core*: the patch owns the detection's position (its core HEALPix pixel);
1. *confirmed*: another patch's detection whose position's owner also detected a source
   within the merge distance (the owner saw it, but placed it across the edge);
2. *unconfirmed*: a detection in another patch's core that this owner did not see (an edge
   artefact of the detecting patch) — dropped.

Detections are taken by (rank, -significance, patch, id) and kept when no kept one lies
within ``merge_distance``: a source on a core edge is decided once, duplicates across
patches collapse onto one entry, and no two entries are closer than ``merge_distance``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.table import Table, vstack
from astropy_healpix import HEALPix
from scipy.spatial import cKDTree

from .analysis import images
from .history import open_history
from .sky import SkyPartition, unit_vectors
from .store_catalog import read_store_catalog
from .survey_store import complete_patches, read_survey_attrs

__all__ = ["allsky_image", "merge_catalogs", "plot_allsky", "survey_catalog"]

#: merged catalog: leading columns (the rest follows find_sources' order)
LEADING = ("id", "patch", "patch_source", "glon", "glat", "ra", "dec", "lon", "lat")


def _chord(angle_deg: float) -> float:
    return 2.0 * math.sin(math.radians(angle_deg) / 2.0)


def merge_catalogs(tables: list[Table], merge_distance: float) -> Table:
    """The all-sky catalog of patch catalogs (`run_patch`'s, with ``patch`` and ``owner``)."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return Table()
    det = vstack(tables, metadata_conflicts="silent")
    xyz = unit_vectors(np.asarray(det["lon"], np.float64), np.asarray(det["lat"], np.float64))
    tree = cKDTree(xyz)
    radius = _chord(merge_distance)
    patch = np.asarray(det["patch"])
    owner = np.asarray(det["owner"])
    rank = np.where(patch == owner, 0, 2)
    for i in np.flatnonzero(rank == 2):
        near = tree.query_ball_point(xyz[i], radius)
        if any(patch[j] == owner[i] for j in near):
            rank[i] = 1
    order = np.lexsort(
        (np.asarray(det["id"]), patch, -np.asarray(det["significance"], np.float64), rank)
    )
    kept: list[int] = []
    kept_tree_points: list[np.ndarray] = []
    for i in order:
        if rank[i] == 2:
            continue
        if kept_tree_points:
            d = np.linalg.norm(np.asarray(kept_tree_points) - xyz[i], axis=1)
            if (d < radius).any():
                continue
        kept.append(int(i))
        kept_tree_points.append(xyz[i])
    out = det[kept]
    out.rename_column("id", "patch_source")
    out["id"] = np.arange(1, len(out) + 1, dtype=np.int64)
    out["id"].description = "all-sky source number, 1 = most significant"
    out["patch"].description = "patch (core HEALPix pixel, NESTED) the entry comes from"
    out["patch_source"].description = "source id in its patch's catalog"
    out.remove_columns([c for c in ("owner", "island", "x", "y") if c in out.colnames])
    for name, text in (("glon", "Galactic longitude"), ("glat", "Galactic latitude")):
        out[name].unit, out[name].description = "deg", text
    out["ra"].unit = out["dec"].unit = "deg"
    rest = [c for c in out.colnames if c not in LEADING]
    out = out[[*LEADING, *rest]]
    out.meta = {k: v for k, v in tables[0].meta.items() if k in ("FRAME", "PIXSIZE")}
    return out


def _settings(path: Path) -> tuple[SkyPartition, dict[str, Any]]:
    attrs = read_survey_attrs(path)
    return SkyPartition.from_dict(attrs["partition"]), attrs["settings"]


def survey_catalog(
    path: str | os.PathLike[str],
    *,
    min_significance: float | None = None,
    merge_distance: float | None = None,
) -> Table:
    """The merged all-sky catalog of the survey store at ``path`` (complete patches only;
    ``meta['INCOMPLETE']`` counts the others). ``min_significance`` drops weaker sources
    before the merge; ``merge_distance`` (deg) overrides the survey's."""
    path = Path(path).expanduser()
    partition, settings = _settings(path)
    done = complete_patches(path, partition.npatch)
    tables = []
    for index in done:
        table = read_store_catalog(path / "patches" / f"{index:04d}.zarr")
        if min_significance is not None and len(table):
            table = table[np.asarray(table["significance"]) >= min_significance]
        tables.append(table)
    distance = settings["merge_distance"] if merge_distance is None else float(merge_distance)
    merged = merge_catalogs(tables, distance)
    merged.meta.update(
        {
            "MERGEDIS": distance,
            "NPATCH": partition.npatch,
            "NINCOMPL": partition.npatch - len(done),
            "FRAME": partition.frame,
            "PIXSIZE": partition.binsz,
        }
    )
    return merged


def allsky_image(
    path: str | os.PathLike[str], name: str = "model", *, nside: int = 64
) -> np.ndarray:
    """A HEALPix map (NESTED, survey frame) of one 2-D image of the patches' final states
    (``cwtflow.images`` names: counts, model, support_2d, ...), each HEALPix pixel read at its
    nearest patch pixel from the patch owning it (NaN where a patch is not complete)."""
    path = Path(path).expanduser()
    partition, _ = _settings(path)
    if nside < partition.nside or nside & (nside - 1):
        raise ValueError(f"nside must be a power of 2 >= the cores' nside {partition.nside}")
    hp = HEALPix(nside, order="nested")
    per_core = (nside // partition.nside) ** 2
    out = np.full(hp.npix, np.nan)
    for index in complete_patches(path, partition.npatch):
        patch = partition.patches[index]
        pix = index * per_core + np.arange(per_core)
        lon, lat = hp.healpix_to_lonlat(pix)
        x, y = patch.wcs().wcs_world2pix(lon.to_value(u.deg), lat.to_value(u.deg), 0)
        ny, nx = patch.shape
        ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
        iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
        image = np.asarray(
            images(open_history(path / "patches" / f"{patch.name}.zarr").final)[name]
        )
        out[pix] = image[iy, ix]
    return out


def plot_allsky(
    hpx: np.ndarray,
    filename: str | os.PathLike[str],
    *,
    catalog: Table | None = None,
    title: str = "",
    frame_label: str = "Galactic",
) -> Path:
    """A Mollweide PNG of a NESTED HEALPix map (``allsky_image``), with the catalog's sources
    as circles; longitude increases to the left as on the sky."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nside = round(math.sqrt(hpx.size / 12))
    hp = HEALPix(nside, order="nested")
    lon = np.linspace(180, -180, 721)
    lat = np.linspace(-90, 90, 361)
    glon, glat = np.meshgrid(lon, lat)
    values = hpx[hp.lonlat_to_healpix((glon % 360) * u.deg, glat * u.deg)]
    fig = plt.figure(figsize=(10, 5.5))
    ax = fig.add_subplot(111, projection="mollweide")
    finite = values[np.isfinite(values)]
    vmax = np.percentile(finite, 99.5) if finite.size else 1.0
    mesh = ax.pcolormesh(
        np.radians(-glon), np.radians(glat), values, shading="auto", cmap="magma", vmin=0, vmax=vmax
    )
    if catalog is not None and len(catalog):
        clon = (np.asarray(catalog["lon"]) + 180) % 360 - 180
        ax.scatter(
            np.radians(-clon),
            np.radians(np.asarray(catalog["lat"])),
            s=18,
            facecolors="none",
            edgecolors="cyan",
            linewidths=0.7,
        )
    ax.set_xticklabels([f"{int(v)}°" for v in (150, 120, 90, 60, 30, 0, 330, 300, 270, 240, 210)])
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{frame_label} frame")
    fig.colorbar(mesh, orientation="horizontal", fraction=0.05, pad=0.06)
    filename = Path(filename)
    fig.savefig(filename, dpi=100)
    plt.close(fig)
    return filename
