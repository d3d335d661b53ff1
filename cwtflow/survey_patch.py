"""One patch of a full-sky survey, as it runs on a worker: its inputs binned (events) or
resampled (maps) onto the patch grid, an ordinary cwtflow run into the patch's own store, its
catalog kept in that store (the patch's completion marker).

A `PatchJob` holds only paths and settings (no pixels), so submitting one to a dask cluster
puts no patch data in the graph; the worker reads the input files itself (once per process).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import astropy.units as u
import dask
import numpy as np
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.table import Table

from .catalog import find_sources
from .engine import CWT
from .events import bin_events, read_events
from .kernels import CWTKernels
from .maps import make_maps
from .resample import read_sky_map, resample
from .sky import Patch, SkyPartition
from .store import has_content
from .store_catalog import read_store_catalog, write_store_catalog

__all__ = ["PatchJob", "SurveySettings", "patch_inputs", "patch_store", "run_patch"]


@dataclass(frozen=True)
class SurveySettings:
    """Everything a patch run needs besides its geometry (JSON-ready via `to_dict`)."""

    kernels: dict[str, Any]
    cwt: dict[str, Any]
    catalog: dict[str, Any]
    psf_sigma: float  # deg
    merge_distance: float  # deg
    counts: str
    counts_kind: str  # "events" or "map"
    background: str
    exposure: str | None
    emin: float | None
    emax: float | None
    chunks: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> SurveySettings:
        params = dict(params)
        if params.get("chunks") is not None:
            params["chunks"] = tuple(params["chunks"])
        return cls(**params)


@dataclass(frozen=True)
class PatchJob:
    """What one task runs: the patch, the partition, the settings and the survey path."""

    patch: Patch
    partition: dict[str, Any]
    settings: SurveySettings
    survey: str
    resume: bool


def patch_store(survey: str | os.PathLike[str], patch: Patch) -> Path:
    """The patch's cwtflow store inside the survey store."""
    return Path(survey) / "patches" / f"{patch.name}.zarr"


def patch_inputs(patch: Patch, settings: SurveySettings) -> xr.Dataset:
    """Counts, background (and exposure) of ``patch`` as `cwtflow.make_maps` input."""
    wcs, shape = patch.wcs(), patch.shape
    if settings.counts_kind == "events":
        events = read_events(
            settings.counts, frame=patch.frame, emin=settings.emin, emax=settings.emax
        )
        counts = bin_events(events, wcs, shape, patch.corner_distance + 2 * patch.binsz)
    else:
        counts = resample(
            read_sky_map(settings.counts), wcs, shape, extensive=True, binsz=patch.binsz
        )
    background = resample(
        read_sky_map(settings.background), wcs, shape, extensive=True, binsz=patch.binsz
    )
    exposure = None
    if settings.exposure is not None:
        exposure = resample(
            read_sky_map(settings.exposure), wcs, shape, extensive=False, binsz=patch.binsz
        )
    return make_maps(counts, background, wcs, exposure=exposure)


def _estimator(settings: SurveySettings) -> CWT:
    kernels = CWTKernels.from_dict(settings.kernels)
    return CWT(kernels, psf=settings.psf_sigma * u.deg, **settings.cwt)


def patch_catalog(result: xr.Dataset, patch: Patch, settings: SurveySettings) -> Table:
    """`find_sources` of the patch with its survey columns ``patch``, ``glon``/``glat`` and
    ``ra``/``dec`` (`run_patch` adds ``owner``, the core of the position)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no sources found" in an empty patch
        table = find_sources(result, psf=settings.psf_sigma * u.deg, **settings.catalog)
    coords = SkyCoord(
        np.asarray(table["lon"], dtype=np.float64) * u.deg,
        np.asarray(table["lat"], dtype=np.float64) * u.deg,
        frame=patch.frame,
    )
    gal, icrs = coords.galactic, coords.icrs
    table["patch"] = np.full(len(table), patch.index, dtype=np.int64)
    table["glon"], table["glat"] = gal.l.deg, gal.b.deg
    table["ra"], table["dec"] = icrs.ra.deg, icrs.dec.deg
    return table


def run_patch(job: PatchJob) -> dict[str, Any]:
    """Run one patch (or skip it when complete); returns its summary (no pixels)."""
    start = time.perf_counter()
    patch, settings = job.patch, job.settings
    store = patch_store(job.survey, patch)
    summary: dict[str, Any] = {"patch": patch.index, "shape": list(patch.shape)}
    done = read_store_catalog(store) if has_content(store) else None
    if done is not None:
        summary.update(done.meta.get("SURVEY", {}), skipped=True)
        return summary
    data = patch_inputs(patch, settings)
    cwt = _estimator(settings)
    resume = job.resume and has_content(store)
    with dask.config.set(scheduler="synchronous"):
        result = cwt.analyze(data, store=store, resume=resume, chunks=settings.chunks)
        table = patch_catalog(result, patch, settings)
    partition = SkyPartition.from_dict(job.partition)
    table["owner"] = (
        partition.owner(table["lon"], table["lat"]) if len(table) else np.zeros(0, np.int64)
    )
    stats = {
        "iterations": int(result.attrs["iterations"]),
        "converged": bool(result.attrs["converged"]),
        "sources": len(table),
        "core_sources": int(np.sum(np.asarray(table["owner"]) == patch.index)),
        "seconds": round(time.perf_counter() - start, 3),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pid": os.getpid(),
    }
    table.meta["SURVEY"] = stats
    write_store_catalog(store, table, overwrite=True)  # the patch's completion marker
    summary.update(stats, skipped=False)
    return summary
