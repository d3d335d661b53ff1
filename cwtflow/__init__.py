"""cwtflow: iterative continuous-wavelet-transform source detection for gamma-ray sky maps."""

from .analysis import (
    cube_metrics,
    cubes,
    derived_images,
    difference,
    image_metrics,
    images,
    state_metrics,
)
from .catalog import find_sources
from .catalog_files import read_catalog, write_catalog, write_regions
from .engine import CWT
from .errors import (
    ClusterError,
    CWTFlowError,
    InputError,
    NotFoundError,
    ParameterError,
    ResourceError,
    StoreError,
)
from .history import History, open_history, read_result
from .io import read_maps, write_maps
from .iteration import IterationInfo
from .kernels import CWTKernels
from .maps import cutout, make_maps, map_center, validate_maps, wcs_from_attrs
from .simulate import simulate_sky
from .state_files import read_state, write_state
from .store_catalog import read_store_catalog, write_store_catalog
from .store_integrity import verify_store
from .survey import Survey, SurveyResult, run_survey
from .version import __version__

__all__ = [
    "CWT",
    "CWTFlowError",
    "CWTKernels",
    "ClusterError",
    "History",
    "InputError",
    "IterationInfo",
    "NotFoundError",
    "ParameterError",
    "ResourceError",
    "StoreError",
    "Survey",
    "SurveyResult",
    "__version__",
    "cube_metrics",
    "cubes",
    "cutout",
    "derived_images",
    "difference",
    "find_sources",
    "image_metrics",
    "images",
    "make_maps",
    "map_center",
    "open_history",
    "plot_images",
    "read_catalog",
    "read_maps",
    "read_result",
    "read_state",
    "read_store_catalog",
    "run_survey",
    "simulate_sky",
    "state_metrics",
    "validate_maps",
    "verify_store",
    "wcs_from_attrs",
    "write_catalog",
    "write_maps",
    "write_regions",
    "write_state",
    "write_store_catalog",
]


def __getattr__(name: str):
    """``plot_images`` is loaded on first use: matplotlib is slow to import."""
    if name == "plot_images":
        from .plotting import plot_images

        return plot_images
    raise AttributeError(f"module 'cwtflow' has no attribute {name!r}")
