"""Partition of the sphere for a full-sky survey: HEALPix cores, rectangular local patches.

Geometry (``docs/fullsky.md`` has the numbers):

- *core*: one HEALPix pixel of a low ``nside`` (NESTED numbering) in the survey frame. Every
  point of the sky belongs to exactly one core (`SkyPartition.owner`,
  ``astropy_healpix.lonlat_to_healpix``).
- *patch*: a local zenithal projection (ZEA by default, TAN on request) centred on the core's
  centre, its pixel grid rotated by the angle that makes the core's bounding rectangle the
  smallest (HEALPix pixels are diamonds; a rotated grid fits them), grown by ``margin``
  pixels on every side. The pixel size at the centre is the survey's ``binsz``.
- *distortion*: at angular distance rho from the centre, ZEA keeps the solid angle of every
  pixel exactly (equal-area) and stretches the scale by ``sec(rho/2)`` tangentially
  (``cos(rho/2)`` radially); TAN stretches it by ``sec(rho)`` and ``sec(rho)**2`` and the
  solid angle by ``sec(rho)**3``. `scale_distortion` is the largest relative scale error; a
  partition reports it at the farthest patch corner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from astropy_healpix import HEALPix

from .errors import InputError

__all__ = [
    "FRAMES",
    "PROJECTIONS",
    "Patch",
    "SkyPartition",
    "pixel_solid_angle",
    "scale_distortion",
    "solid_angle_distortion",
    "unit_vectors",
]

PROJECTIONS = ("ZEA", "TAN")
#: survey frame -> (longitude, latitude) CTYPE prefixes
FRAMES = {"galactic": ("GLON", "GLAT"), "icrs": ("RA--", "DEC-")}
#: rotation angles (deg) tried for the patch grid
_ANGLES = np.arange(0.0, 90.0, 5.0)
#: boundary points per core edge used to find its bounding rectangle
_STEP = 16


def scale_distortion(rho_deg: Any, proj: str = "ZEA") -> Any:
    """Largest relative pixel-scale error at angular distance ``rho_deg`` from the centre."""
    rho = np.radians(rho_deg)
    if proj == "ZEA":
        return 1.0 / np.cos(rho / 2.0) - 1.0
    if proj == "TAN":
        return 1.0 / np.cos(rho) ** 2 - 1.0
    raise InputError(f"projection must be one of {PROJECTIONS}, got {proj!r}")


def solid_angle_distortion(rho_deg: Any, proj: str = "ZEA") -> Any:
    """Relative pixel solid-angle error at ``rho_deg`` from the centre (ZEA: none)."""
    rho = np.radians(rho_deg)
    if proj == "ZEA":
        return np.zeros_like(rho)
    if proj == "TAN":
        return 1.0 / np.cos(rho) ** 3 - 1.0
    raise InputError(f"projection must be one of {PROJECTIONS}, got {proj!r}")


def unit_vectors(lon: Any, lat: Any) -> np.ndarray:
    """Cartesian unit vectors (..., 3) of longitudes and latitudes in degrees."""
    lon, lat = np.radians(lon), np.radians(lat)
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)


def pixel_solid_angle(wcs: WCS, shape: tuple[int, int]) -> np.ndarray:
    """Solid angle (sr) of every pixel, from its four corners as a spherical quadrilateral
    (two triangles, Van Oosterom & Strackee 1983)."""
    ny, nx = shape
    yc, xc = np.mgrid[-0.5 : ny + 0.5, -0.5 : nx + 0.5]
    lon, lat = wcs.celestial.wcs_pix2world(xc, yc, 0)
    v = unit_vectors(lon, lat)
    a, b, c, d = v[:-1, :-1], v[:-1, 1:], v[1:, 1:], v[1:, :-1]

    def triangle(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        num = np.abs(np.einsum("...i,...i", p, np.cross(q, r)))
        den = 1.0 + np.einsum("...i,...i", p, q) + np.einsum("...i,...i", q, r)
        den += np.einsum("...i,...i", r, p)
        return 2.0 * np.arctan2(num, den)

    return triangle(a, b, c) + triangle(a, c, d)


@dataclass(frozen=True)
class Patch:
    """One patch: its core (HEALPix pixel ``index``), centre, grid rotation and shape."""

    index: int
    lon: float
    lat: float
    rotation: float
    shape: tuple[int, int]
    binsz: float
    proj: str
    frame: str
    corner_distance: float  # deg, farthest pixel corner from the centre

    @property
    def name(self) -> str:
        """Four-digit name of the patch (its store is ``patches/<name>.zarr``)."""
        return f"{self.index:04d}"

    def wcs(self) -> WCS:
        """The patch's celestial WCS (pixel centres on integers, 0-based centre pixel)."""
        return _patch_wcs(self)

    def contains(self, lon: Any, lat: Any, *, margin: float = 0.0) -> np.ndarray:
        """Whether sky positions fall on the patch's pixels at least ``margin`` pixels inside."""
        x, y = self.wcs().wcs_world2pix(np.asarray(lon), np.asarray(lat), 0)
        ny, nx = self.shape
        inside = (x >= margin - 0.5) & (x <= nx - 0.5 - margin)
        return inside & (y >= margin - 0.5) & (y <= ny - 0.5 - margin)


def _patch_wcs(patch: Patch) -> WCS:
    lon, lat, binsz, shape = patch.lon, patch.lat, patch.binsz, patch.shape
    prefix = FRAMES[patch.frame]
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [f"{prefix[0]}-{patch.proj}", f"{prefix[1]}-{patch.proj}"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = [lon, lat]
    wcs.wcs.cdelt = [-binsz, binsz]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    t = math.radians(patch.rotation)
    # pixel offsets p = R(t) p0 of the unrotated grid p0: PC = D R(-t) D, D = diag(-1, 1)
    wcs.wcs.pc = [[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]]
    if patch.frame == "icrs":
        wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


@dataclass(frozen=True)
class SkyPartition:
    """Cores and patches of a full-sky survey.

    Parameters
    ----------
    nside : int
        HEALPix nside of the cores (a power of 2): ``12 * nside**2`` patches.
    binsz : float
        Pixel size (deg) at each patch's centre.
    margin : int
        Pixels added on every side of a core's bounding rectangle (the overlap between
        neighbouring patches is at least twice this).
    proj : {"ZEA", "TAN"}
        Local projection of the patches.
    frame : {"galactic", "icrs"}
        Frame of the cores and of the patch grids.
    """

    nside: int
    binsz: float
    margin: int
    proj: str = "ZEA"
    frame: str = "galactic"
    healpix: HEALPix = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nside = self.nside
        if (
            isinstance(nside, bool)
            or int(nside) != nside
            or nside < 1
            or int(nside) & (int(nside) - 1)
        ):
            raise InputError(f"nside must be a power of 2, got {nside!r}")
        if not (np.isfinite(self.binsz) and 0 < self.binsz <= 5):
            raise InputError(f"binsz must be a pixel size in (0, 5] deg, got {self.binsz!r}")
        if isinstance(self.margin, bool) or int(self.margin) != self.margin or self.margin < 0:
            raise InputError(f"margin must be a non-negative integer, got {self.margin!r}")
        if self.proj not in PROJECTIONS:
            raise InputError(f"projection must be one of {PROJECTIONS}, got {self.proj!r}")
        if self.frame not in FRAMES:
            raise InputError(f"frame must be one of {tuple(FRAMES)}, got {self.frame!r}")
        object.__setattr__(self, "nside", int(nside))
        object.__setattr__(self, "binsz", float(self.binsz))
        object.__setattr__(self, "margin", int(self.margin))
        object.__setattr__(self, "healpix", HEALPix(self.nside, order="nested"))

    @classmethod
    def choose(
        cls,
        binsz: float,
        margin: int,
        *,
        proj: str = "ZEA",
        frame: str = "galactic",
        max_distortion: float = 0.01,
    ) -> SkyPartition:
        """The partition of the lowest nside whose patch corners stay within
        ``max_distortion`` of pixel-scale error."""
        nside = 1
        while nside <= 1024:
            partition = cls(nside, binsz, margin, proj=proj, frame=frame)
            if partition.max_scale_distortion <= max_distortion:
                return partition
            nside *= 2
        raise InputError(f"no nside <= 1024 keeps the distortion below {max_distortion}")

    @property
    def npatch(self) -> int:
        return 12 * self.nside**2

    def owner(self, lon: Any, lat: Any) -> np.ndarray:
        """Index of the core owning each sky position (deg, survey frame)."""
        import astropy.units as u

        return np.asarray(
            self.healpix.lonlat_to_healpix(np.asarray(lon) * u.deg, np.asarray(lat) * u.deg)
        )

    @cached_property
    def patches(self) -> tuple[Patch, ...]:
        return tuple(self._patch(i) for i in range(self.npatch))

    def _patch(self, index: int) -> Patch:
        hp = self.healpix
        clon, clat = (q.to_value("deg") for q in hp.healpix_to_lonlat(index))
        blon, blat = (q.to_value("deg")[0] for q in hp.boundaries_lonlat([index], step=_STEP))
        probe = Patch(index, float(clon), float(clat), 0.0, (1, 1), 1.0, self.proj, self.frame, 0)
        x0, y0 = probe.wcs().wcs_world2pix(blon, blat, 0)  # offsets in deg at the centre
        best = None
        for angle in _ANGLES:
            t = math.radians(angle)
            u_ = math.cos(t) * x0 - math.sin(t) * y0
            v_ = math.sin(t) * x0 + math.cos(t) * y0
            hx, hy = np.abs(u_).max(), np.abs(v_).max()
            if best is None or hx * hy < best[0] - 1e-9:
                best = (hx * hy, angle, hx, hy)
        _, angle, hx, hy = best
        nx = 2 * (math.ceil(hx / self.binsz) + self.margin) + 1
        ny = 2 * (math.ceil(hy / self.binsz) + self.margin) + 1
        patch = Patch(
            index,
            float(clon),
            float(clat),
            float(angle),
            (ny, nx),
            self.binsz,
            self.proj,
            self.frame,
            0.0,
        )
        corners_x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        corners_y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        lon, lat = patch.wcs().wcs_pix2world(corners_x, corners_y, 0)
        cos_sep = unit_vectors(lon, lat) @ unit_vectors(clon, clat)
        corner = float(np.degrees(np.arccos(np.clip(cos_sep, -1, 1))).max())
        return replace(patch, corner_distance=corner)

    @property
    def max_corner_distance(self) -> float:
        return max(p.corner_distance for p in self.patches)

    @property
    def max_scale_distortion(self) -> float:
        return float(scale_distortion(self.max_corner_distance, self.proj))

    @property
    def pixels(self) -> int:
        """Pixels of all patches together."""
        return sum(p.shape[0] * p.shape[1] for p in self.patches)

    @property
    def overhead(self) -> float:
        """Patch pixels over the sky's solid angle in pixels of ``binsz`` (>= 1)."""
        return self.pixels / (4 * math.pi * (180 / math.pi) ** 2 / self.binsz**2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nside": self.nside,
            "binsz": self.binsz,
            "margin": self.margin,
            "proj": self.proj,
            "frame": self.frame,
        }

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> SkyPartition:
        return cls(
            params["nside"], params["binsz"], params["margin"], params["proj"], params["frame"]
        )

    def info_table(self) -> Table:
        """One row per patch: index, centre, rotation, shape, farthest corner, distortion."""
        rows = [
            (
                p.index,
                p.lon,
                p.lat,
                p.rotation,
                p.shape[0],
                p.shape[1],
                p.corner_distance,
                float(scale_distortion(p.corner_distance, self.proj)),
            )
            for p in self.patches
        ]
        names = ("patch", "lon", "lat", "rotation", "ny", "nx", "corner_distance", "distortion")
        return Table(rows=rows, names=names)
