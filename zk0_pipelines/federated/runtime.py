"""Per-process cache of what a client builds once and reuses across rounds (policy, dataset, processors).

In simulation a Ray actor serves several rounds (and possibly several partitions); in deployment a SuperNode's
ClientApp process serves its rounds. Building SmolVLA and opening the dataset once per (dataset, PolicySpec)
keeps later rounds cheap. The frozen-weight fingerprint is computed once at build time: those weights are
never trained, so it stays valid.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0_pipelines import env_settings
from zk0_pipelines.federated import dataset_view, task

_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[str, str], ClientRuntime] = OrderedDict()


def _cache_size() -> int:
    return max(1, env_settings.CLIENT_CACHE_SIZE.integer())


@dataclass
class ClientRuntime:
    """A client's policy, dataset and processors for one dataset root and one PolicySpec."""

    root: Path
    meta: Any
    policy: Any
    dataset: Any
    fingerprint: str
    cameras: Any = None
    _processors: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def processors(self, stats_json: str) -> tuple[Any, Any]:
        """Pre/post-processors normalising with ``stats_json`` (the run's aggregated stats), cached."""
        from zk0_pipelines.policy import build_processors

        key = task.stats_digest(stats_json)
        if key not in self._processors:
            self._processors.clear()
            rename = self.cameras.rename if self.cameras is not None else None
            self._processors[key] = build_processors(
                self.policy, dataset_view.stats_from_json(stats_json), rename
            )
        return self._processors[key]


def get_client_runtime(root: Path, spec) -> ClientRuntime:
    """The cached :class:`ClientRuntime` for ``root`` and ``spec`` (a ``PolicySpec``), built on first use."""
    from zk0_pipelines.policy import build_policy, frozen_fingerprint

    key = (str(Path(root).resolve()), json.dumps(spec.to_dict(), sort_keys=True))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        meta = task.open_metadata(Path(root))
        features, stats, cameras = dataset_view.policy_view(Path(root), meta)
        policy = build_policy(spec, task.PolicyMeta(features=features, stats=stats))
        runtime = ClientRuntime(
            root=Path(root),
            meta=meta,
            policy=policy,
            dataset=task.open_dataset(Path(root), policy, meta),
            fingerprint=frozen_fingerprint(policy),
            cameras=cameras,
        )
        _CACHE[key] = runtime
        while len(_CACHE) > _cache_size():
            _CACHE.popitem(last=False)
        return runtime


def clear_cache() -> None:
    """Drop every cached runtime (tests)."""
    with _LOCK:
        _CACHE.clear()
