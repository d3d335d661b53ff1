"""Cut-outs of the map for the catalog: the support islands' bounding boxes and the square fit
windows around candidates (`cwtflow.refine.Windows`).

Boxes are ``(y0, y1, x0, x1)`` in map pixels; on an all-sky map (x wrapping around) a box may
run past the map's right edge and `take_box` continues it across the seam. A window is cut from
an island's box (`fit_window`) or straight from the map (`windows_at`); its pixels outside the
map are zero and not valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask
import numpy as np
from scipy import ndimage

from .refine import Windows

__all__ = ["fit_window", "grow_box", "island_boxes", "stack_windows", "take_box", "windows_at"]


def island_boxes(labels: np.ndarray, n: int, wrap: bool) -> list[tuple[int, int, int, int]]:
    """Bounding box ``(y0, y1, x0, x1)`` of every island; on a wrapping map ``x1`` may exceed
    the map width (the box continues across the seam) for islands that cross it."""
    nx = labels.shape[1]
    boxes = []
    for label, sl in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if wrap and x0 == 0 and x1 == nx:
            cols = np.flatnonzero((labels[y0:y1] == label).any(axis=0))
            gaps = np.diff(np.append(cols, cols[0] + nx))
            widest = int(np.argmax(gaps))
            if gaps[widest] > 1:
                # the box starts after the widest empty run of columns
                x0 = int(cols[(widest + 1) % cols.size])
                x1 = int(cols[widest]) + 1 + (nx if x0 > cols[widest] else 0)
            else:
                # a ring all around the sky: cut it where it is thinnest
                thin = int(np.argmin((labels[y0:y1] == label).sum(axis=0)))
                x0, x1 = thin + 1, thin + 1 + nx
        boxes.append((y0, y1, x0, x1))
    return boxes


def grow_box(
    box: tuple[int, int, int, int], margin: int, shape: tuple[int, int], wrap: bool
) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` pixels: clipped at the map's edges, except along a
    wrapping x axis where it continues across the seam (never wider than the map)."""
    y0, y1, x0, x1 = box
    ny, nx = shape
    y0, y1 = max(0, y0 - margin), min(ny, y1 + margin)
    if not wrap:
        return y0, y1, max(0, x0 - margin), min(nx, x1 + margin)
    if (x1 - x0) + 2 * margin >= nx:
        start = x0 - (nx - (x1 - x0)) // 2
        return y0, y1, start, start + nx
    return y0, y1, x0 - margin, x1 + margin


def take_box(array: Any, box: tuple[int, int, int, int], nx: int) -> Any:
    """``array[..., y0:y1, x0:x1]`` with x continued periodically outside ``0 .. nx``."""
    y0, y1, x0, x1 = box
    if 0 <= x0 and x1 <= nx:
        return array[..., y0:y1, x0:x1]
    return array[..., y0:y1, :][..., np.arange(x0, x1) % nx]


def fit_window(
    cut: dict[str, np.ndarray], box: tuple[int, int, int, int], x: float, y: float, half: int
) -> tuple[np.ndarray, ...]:
    """(counts, background, exposure or None, valid, origin) of the window of side
    ``2 half + 1`` centred on the pixel nearest (x, y) (cut-out frame); pixels outside the
    cut-out (outside the map) are not valid."""
    cy, cx = round(y), round(x)
    ny, nx = cut["counts"].shape
    size = 2 * half + 1
    y0, x0 = cy - half, cx - half
    sy = slice(max(0, y0), min(ny, y0 + size))
    sx = slice(max(0, x0), min(nx, x0 + size))
    ty = slice(sy.start - y0, sy.stop - y0)
    tx = slice(sx.start - x0, sx.stop - x0)
    out = []
    for name in ("counts", "background", "exposure"):
        if name not in cut:
            out.append(None)
            continue
        w = np.zeros((size, size))
        w[ty, tx] = cut[name][sy, sx]
        out.append(w)
    valid = np.zeros((size, size), dtype=bool)
    valid[ty, tx] = True
    origin = np.array([box[0] + y0, box[2] + x0], dtype=np.float64)
    return (*out, valid, origin)


def windows_at(
    arrays: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    half: int,
    shape: tuple[int, int],
    wrap: bool,
) -> Windows:
    """Windows of side ``2 half + 1`` centred on (x, y) (map pixels), read in one pass."""
    names = [name for name in ("counts", "background", "exposure") if name in arrays]
    boxes = []
    for cx, cy in zip(np.round(x).astype(int), np.round(y).astype(int), strict=True):
        boxes.append(grow_box((cy, cy + 1, cx, cx + 1), half, shape, wrap))
    lazy = [{name: take_box(arrays[name], box, shape[1]) for name in names} for box in boxes]
    cuts = (
        dask.compute(*lazy) if any(not isinstance(arrays[n], np.ndarray) for n in names) else lazy
    )
    parts = [
        fit_window(
            {k: np.asarray(v, dtype=np.float64) for k, v in cut.items()},
            box,
            float(cx - box[2]),
            float(cy - box[0]),
            half,
        )
        for cut, box, cx, cy in zip(cuts, boxes, x, y, strict=True)
    ]
    return stack_windows(parts)


def stack_windows(parts: Sequence[tuple[Any, ...]]) -> Windows:
    """One `Windows` from `fit_window`'s tuples."""
    counts, background, exposure, valid, origin = (list(v) for v in zip(*parts, strict=True))
    return Windows(
        counts=np.stack(counts),
        background=np.stack(background),
        exposure=None if exposure[0] is None else np.stack(exposure),
        valid=np.stack(valid),
        origin=np.stack(origin),
    )
