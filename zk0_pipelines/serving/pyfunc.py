"""MLflow ``pyfunc`` flavour of a registered lerobot SmolVLA folder.

Every registered version's folder also carries an ``MLmodel`` file (:func:`log_pyfunc_flavor`) whose
pyfunc loader is this module, with the folder itself as its data, so::

    model = mlflow.pyfunc.load_model("models:/zk0-smolvla-so100@champion")
    actions = model.predict({"observation.state": state, "observation.images.top": hwc, "task": "..."})

returns the un-normalised action chunk, shape ``(chunk_size, action_dim)``. The folder stays a plain
lerobot folder (lerobot ignores ``MLmodel``). The loading side needs ``zk0_pipelines`` installed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

LOADER_MODULE = "zk0_pipelines.serving.pyfunc"
MLMODEL_FILE = "MLmodel"
STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."


class PolicyPredictor:
    """Loaded policy + processors; ``predict(observation)`` → action chunk (numpy, raw units)."""

    def __init__(self, folder: Path, device: str = "cpu"):
        from zk0_pipelines.policy.export import load_policy_folder

        self.folder = Path(folder)
        self.device = device
        self.policy, self.preprocessor, self.postprocessor = load_policy_folder(self.folder, device=device)

    def _batch(self, observation: dict[str, Any]) -> dict[str, Any]:
        import torch

        expected = set(self.policy.config.input_features)
        missing = sorted(expected - set(observation))
        if missing:
            raise KeyError(f"observation for {self.folder.name} lacks {missing} (has {sorted(observation)})")
        batch: dict[str, Any] = {"task": str(observation.get("task", ""))}
        for key in expected:
            value = torch.as_tensor(np.asarray(observation[key]))
            if key.startswith(IMAGE_PREFIX):
                if value.dtype == torch.uint8:
                    value = value.float() / 255.0
                if value.ndim == 3 and value.shape[-1] in (1, 3):  # HWC → CHW
                    value = value.permute(2, 0, 1)
                value = value.unsqueeze(0) if value.ndim == 3 else value
            else:
                value = value.float()
                value = value.unsqueeze(0) if value.ndim == 1 else value
            batch[key] = value.contiguous()
        return batch

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Action chunk for one observation (a dict, or a one-row DataFrame). ``params``: ``seed``."""
        import torch

        if hasattr(model_input, "to_dict") and hasattr(model_input, "iloc"):
            if len(model_input) != 1:
                raise ValueError(f"predict takes one observation, got {len(model_input)} rows")
            model_input = model_input.iloc[0].to_dict()
        if not isinstance(model_input, dict):
            raise TypeError(f"predict takes an observation dict, got {type(model_input).__name__}")
        batch = self.preprocessor(self._batch(model_input))
        config = self.policy.config
        noise = None
        if params and params.get("seed") is not None:
            generator = torch.Generator().manual_seed(int(params["seed"]))
            noise = torch.randn((1, config.chunk_size, config.max_action_dim), generator=generator)
            noise = noise.to(self.device)
        with torch.no_grad():
            chunk = self.policy.predict_action_chunk(batch, noise=noise)
            actions = self.postprocessor(chunk)
        return actions.detach().to("cpu", torch.float32).numpy()[0]


def _load_pyfunc(data_path: str) -> PolicyPredictor:
    """MLflow's pyfunc loader hook (``loader_module``): ``data_path`` is the lerobot folder."""
    return PolicyPredictor(Path(data_path))


def write_mlmodel(folder: Path) -> Path:
    """Write the ``MLmodel`` file that makes ``folder`` loadable with ``mlflow.pyfunc.load_model``."""
    import mlflow.pyfunc
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    # Only a params schema: observations are free-form dicts (images, state, task) checked by predict.
    model = Model(signature=ModelSignature(params=ParamSchema([ParamSpec("seed", "long", None)])))
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE, data=".")
    path = Path(folder) / MLMODEL_FILE
    model.save(str(path))
    return path


def log_pyfunc_flavor(client: Any, run_id: str, artifact_path: str = "model") -> None:
    """Add the ``MLmodel`` file to a logged lerobot folder (``runs:/<run_id>/<artifact_path>``)."""
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(write_mlmodel(Path(tmp))), artifact_path=artifact_path)
