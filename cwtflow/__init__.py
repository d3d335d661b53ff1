"""cwtflow: iterative continuous-wavelet-transform source detection for gamma-ray sky maps."""

from importlib.metadata import PackageNotFoundError, version

from .analysis import (
    cube_metrics,
    cubes,
    derived_images,
    difference,
    image_metrics,
    images,
    state_metrics,
)
from .engine import CWT, IterationInfo
from .errors import CWTFlowError, InputError, StoreError
from .history import History, open_history, read_result
from .kernels import CWTKernels
from .maps import cutout, make_maps, map_center, validate_maps, wcs_from_attrs

try:
    __version__ = version("cwtflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "CWT",
    "CWTFlowError",
    "CWTKernels",
    "History",
    "InputError",
    "IterationInfo",
    "StoreError",
    "__version__",
    "cube_metrics",
    "cubes",
    "cutout",
    "derived_images",
    "difference",
    "image_metrics",
    "images",
    "make_maps",
    "map_center",
    "open_history",
    "read_result",
    "state_metrics",
    "validate_maps",
    "wcs_from_attrs",
]
