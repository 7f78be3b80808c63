"""The MLflow pyfunc of a trained vaepipe model: encode, decode, reconstruct, sample.

One ``predict`` serves every method, chosen with the ``method`` param. All inputs and
outputs are float32 4-D tensors, so one signature fits every family:

| method        | input                                   | output                     |
|---------------|-----------------------------------------|----------------------------|
| reconstruct   | images ``[N, C, H, W]`` in [0, 1]        | images ``[N, C, H, W]``     |
| encode        | images ``[N, C, H, W]``                  | posterior means ``[N, D, 1, 1]`` |
| decode        | latents ``[N, D, 1, 1]``                 | images                     |
| sample        | ignored (send ``np.zeros((1,1,1,1))``)   | ``n`` images from the prior (params ``seed``, ``temperature`` for vdvae) |

```python
m = mlflow.pyfunc.load_model("models:/vae-celeba@champion")
recon = m.predict(images)                                   # reconstruct
codes = m.predict(images, params={"method": "encode"})
faces = m.predict(np.zeros((1, 1, 1, 1), np.float32), params={"method": "sample", "n": 16})
```
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

try:  # imported lazily by MLflow at load time; the class must exist where mlflow does
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a hard dependency of the pipeline
    _Base = object

METHODS = ("reconstruct", "encode", "decode", "sample")


class VaePyfunc(_Base):
    def load_context(self, context) -> None:
        import torch

        from models import build_model

        blob = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model = build_model(dict(blob["model_config"]))
        self.model.load_state_dict(blob["state_dict"])
        self.model.eval()

    # The hints say what the explicit tensor signature says (MLflow warns at class definition
    # when predict has none, and infers nothing from an ndarray hint).
    def predict(self, context, model_input: np.ndarray, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        import torch

        params = params or {}
        method = params.get("method", "reconstruct")
        if method not in METHODS:
            raise ValueError(f"params.method={method!r} is not one of {METHODS}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            if method == "reconstruct":
                out = self.model.reconstruct(x)
            elif method == "encode":
                out = self.model.encode(x)
                out = out[0] if isinstance(out, (tuple, list)) else out  # Gaussian families: the mean
                out = out[:, :, None, None] if out.dim() == 2 else out
            elif method == "decode":
                # vector latents travel as [N, D, 1, 1]; grid latents (VQ) as they are
                out = self.model.decode(x.flatten(1) if x.shape[-2:] == (1, 1) else x)
            else:
                out = self._sample(params)
        return out.float().cpu().numpy()


    def _sample(self, params: dict):
        import torch

        temperature = float(params.get("temperature", 1.0))
        torch.manual_seed(int(params.get("seed", 0)))
        if temperature == 1.0:
            return self.model.sample(int(params.get("n", 16)))
        if not getattr(self.model, "samples_at_temperature", False):
            raise ValueError(f"params.temperature={temperature}: {type(self.model).__name__} samples at "
                             "temperature 1 only (families with a temperature: vdvae)")
        return self.model.sample(int(params.get("n", 16)), temperature=temperature)


def check_model_uri(model_uri: str) -> None:
    """Fail with a message naming what is missing when ``models:/name@alias`` or ``models:/name/N``
    does not exist (MLflow's own error says neither the alias nor what exists)."""
    import re

    import mlflow

    m = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", model_uri)
    if not m:
        return
    name, alias, version = m.groups()
    client = mlflow.MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"{model_uri}: no registered model named {name!r} at {mlflow.get_tracking_uri()}") from None
    if alias and alias not in registered.aliases:
        have = ", ".join(sorted(registered.aliases)) or "none"
        raise ValueError(f"{model_uri}: registered model {name!r} has no alias {alias!r} (its aliases: {have})")
    if version and not client.search_model_versions(f"name='{name}' and version_number={version}"):
        raise ValueError(f"{model_uri}: registered model {name!r} has no version {version}")


def load_logged_weights(model_uri: str) -> dict:
    """``{"model_config", "state_dict", "config"}`` of a logged or registered vaepipe model."""
    import mlflow
    import torch

    check_model_uri(model_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    path = local / "artifacts" / "weights.pt"
    if not path.exists():
        raise FileNotFoundError(f"{model_uri} is not a vaepipe model: no artifacts/weights.pt in it")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_signature(channels: int, resolution: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    tensor = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))])
    params = ParamSchema([
        ParamSpec("method", "string", "reconstruct"),
        ParamSpec("n", "long", 16),
        ParamSpec("seed", "long", 0),
        ParamSpec("temperature", "double", 1.0),
    ])
    return ModelSignature(inputs=tensor, outputs=tensor, params=params)


@contextmanager
def _quiet(logger: str):
    """``logger`` says only errors inside the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def log_pyfunc(run_id: str, weights_path: Path, model_config: dict, config_yaml: str, step: int = 0,
               tags: Optional[dict] = None, params: Optional[dict] = None) -> str:
    """Log the model into ``run_id`` as a pyfunc, an MLflow LoggedModel of training step ``step``;
    returns its model URI (``models:/<model id>``)."""
    import mlflow
    import torch

    repo = Path(__file__).resolve().parents[1]
    res, ch = model_config.get("resolution", 64), model_config.get("in_channels", 3)
    example = np.random.default_rng(0).random((2, ch, res, res), dtype=np.float32)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings(), _quiet("mlflow.pyfunc"):
        # The signature below is explicit; MLflow's nudge towards an input example is noise here, and
        # so is its warning (a log line) that a python_model object is serialised with CloudPickle:
        # the class is ours, and its code travels with it (code_paths).
        warnings.filterwarnings("ignore", message=".*input example.*")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=VaePyfunc(),
            artifacts={"weights": str(weights_path)},
            code_paths=[str(repo / "models"), str(repo / "pipeline")],
            signature=model_signature(ch, res),
            input_example=None,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy", "omegaconf"],
            metadata={"vaepipe_model_config": model_config, "example_shape": list(example.shape)},
            step=step,
            tags=tags,
            params=params,
        )
        mlflow.log_text(config_yaml, "model_config/resolved.yaml")
    return info.model_uri
