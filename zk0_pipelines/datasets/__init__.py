"""SO-100 datasets: registry, sources (hub / local / synthetic), synthetic generator, validation.

Names are imported lazily so that light users (e.g. the decode worker processes of the validation)
do not pay for pandas, pydantic or LeRobot imports.
"""

from __future__ import annotations

from zk0_pipelines._lazy import lazy_exports

_EXPORTS = {
    "SO100_JOINTS": "so100",
    "CAMERA_KEYS": "so100",
    "so100_features": "so100",
    "SyntheticSpec": "synthetic",
    "write_synthetic_so100": "synthetic",
    "MOTIONS": "synthetic",
    "DatasetSource": "registry",
    "DatasetEntry": "registry",
    "DatasetRegistry": "registry",
    "load_registry": "registry",
    "FetchResult": "sources",
    "fetch_dataset": "sources",
    "DatasetFetchError": "sources",
    "CheckOutcome": "validation",
    "ValidationReport": "validation",
    "validate_dataset": "validation",
    "CHECK_NAMES": "validation",
    "shutdown_decode_pool": "validation",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
