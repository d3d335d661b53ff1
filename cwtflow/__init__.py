"""cwtflow: iterative continuous-wavelet-transform source detection for gamma-ray sky maps.

The public names load their module on first use (PEP 562), so that importing a submodule such
as `cwtflow.cli` does not import numpy, dask, xarray and astropy first (``cwtflow --help``).
"""

from .errors import (
    ClusterError,
    CWTFlowError,
    InputError,
    NotFoundError,
    ParameterError,
    ResourceError,
    StoreError,
)
from .version import __version__

#: public name -> module that defines it
_LAZY = {
    "cube_metrics": "analysis",
    "cubes": "analysis",
    "derived_images": "analysis",
    "difference": "analysis",
    "image_metrics": "analysis",
    "images": "analysis",
    "state_metrics": "analysis",
    "find_sources": "catalog",
    "read_catalog": "catalog_files",
    "write_catalog": "catalog_files",
    "write_regions": "catalog_files",
    "CWT": "engine",
    "History": "history",
    "open_history": "history",
    "read_result": "history",
    "read_maps": "io",
    "read_state": "state_files",
    "write_maps": "io",
    "write_state": "state_files",
    "IterationInfo": "iteration",
    "CWTKernels": "kernels",
    "cutout": "maps",
    "make_maps": "maps",
    "map_center": "maps",
    "validate_maps": "maps",
    "wcs_from_attrs": "maps",
    "plot_images": "plotting",
    "simulate_sky": "simulate",
    "read_store_catalog": "store_catalog",
    "write_store_catalog": "store_catalog",
    "verify_store": "store_integrity",
    "Survey": "survey",
    "SurveyResult": "survey",
    "run_survey": "survey",
}

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
    """Load a public name's module on first use (matplotlib, dask, xarray are slow to import)."""
    import importlib

    module = _LAZY.get(name)
    if module is None:  # a submodule, as `import cwtflow; cwtflow.maps` always allowed
        if not name.startswith("_"):
            try:
                return importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError:
                pass
        raise AttributeError(f"module 'cwtflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
