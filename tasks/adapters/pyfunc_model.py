"""The served model: an MLflow pyfunc that owns preprocessing, class names and the weights.

Logged as "model from code": MLflow copies *this file* into the model and runs it when the
model loads (``mlflow.models.set_model`` at the bottom), and ``code_paths`` carries the
project's ``transfer`` package along, so ``models:/<name>@champion`` loads and serves from any
working directory without pickled Python objects. The weights are the saved model dir
(``model.pt`` state_dict, read with ``weights_only=True``, + ``model.json``), logged as the
artifact ``model_dir``.

Request (one row per image; the batch size is free)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/JPEG>"], ...]}}
    {"dataframe_records": [{"tensor": [[...]]}, ...]}     # float (C,S,S) or (S,S), model space

Response: ``{"predictions": [{"label": "7", "probability": 0.93,
"probabilities": {"0": 0.001, ...}}, ...]}``. A client error (bad base64, wrong tensor shape,
too many rows, image too large) is HTTP 400 ``{"error_code": "INVALID_PARAMETER_VALUE",
"message": "row 3: not valid base64 ..."}``, without a stack trace.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, Map, Schema

from transfer.predict import DEFAULT_MAX_BATCH, DEFAULT_MAX_IMAGE_BYTES, InputError, Predictor
from transfer.predict import MAX_PIXELS

log = logging.getLogger(__name__)

MODEL_DIR_ARTIFACT = "model_dir"
IMAGE_COLUMN = "image"
TENSOR_COLUMN = "tensor"
# Serve-time overrides of the limits logged in the model config (``transfer serve`` sets them
# from params.serve); device: auto | cpu | cuda.
ENV_MAX_BATCH = "TRANSFER_SERVE_MAX_BATCH"
ENV_MAX_IMAGE_BYTES = "TRANSFER_SERVE_MAX_IMAGE_BYTES"
ENV_MAX_IMAGE_PIXELS = "TRANSFER_SERVE_MAX_IMAGE_PIXELS"
ENV_DEVICE = "TRANSFER_SERVE_DEVICE"

# What the served model imports: the pyfunc itself plus the ``transfer`` core (see CONTRACTS.md).
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "pandas",
    "pydantic",
    "pyyaml",
    "scikit-learn",
    "matplotlib",
)

INPUT_SCHEMA = Schema(
    [
        ColSpec("string", IMAGE_COLUMN, required=False),  # base64 PNG/JPEG, one image per row
        ColSpec(AnyType(), TENSOR_COLUMN, required=False),  # nested lists, (C,S,S) or (S,S) float
    ]
)
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("string", "label"),
        ColSpec("double", "probability"),
        ColSpec(Map("double"), "probabilities"),
    ]
)
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)  # no fixed batch size


class ServingInputError(MlflowException, InputError):
    """A client error: HTTP 400 from the scoring server, ``TransferError`` for the CLI.

    MLflow's scoring server answers an ``MlflowException`` raised by ``predict`` with
    ``serialize_as_json()`` (no ``stack_trace`` key unless one is passed in) and the status of
    its error code (INVALID_PARAMETER_VALUE -> 400). It first rewrites ``message`` to
    ``"Failed to predict data '<repr of the whole input>'. Error: ..."``; echoing the client's
    payload (possibly megabytes of base64) back is noise, so ``message`` keeps its first value.
    """

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays / lists: present
        return False


def dataframe_to_rows(frame: pd.DataFrame, max_batch: int) -> list[Any]:
    """Request rows -> items for ``Predictor.predict``: the image string, else the tensor."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    columns = [c for c in (IMAGE_COLUMN, TENSOR_COLUMN) if c in frame.columns]
    if not columns:
        got = ", ".join(map(str, frame.columns)) or "none the model knows"
        raise InputError(
            f"expected a column '{IMAGE_COLUMN}' (base64 PNG/JPEG) or '{TENSOR_COLUMN}' "
            f"(nested lists); got columns: {got}"
        )
    if len(frame) > max_batch:  # before decoding anything
        raise InputError(
            f"batch too large: {len(frame)} rows, the limit is {max_batch} (serve.max_batch); "
            "split the request"
        )
    rows: list[Any] = []
    for index, record in enumerate(frame[columns].itertuples(index=False, name=None)):
        value = next((v for v in record if not _is_missing(v)), None)
        if value is None:
            raise InputError(f"row {index}: no '{IMAGE_COLUMN}' and no '{TENSOR_COLUMN}' value")
        rows.append(value)
    return rows


class TransferPyfuncModel(mlflow.pyfunc.PythonModel):
    """Decode + normalise like training, run the net, answer class names and probabilities."""

    predictor: Predictor

    def load_context(self, context: Any) -> None:
        config = dict(context.model_config or {})
        max_batch = int(os.environ.get(ENV_MAX_BATCH) or config.get("max_batch", DEFAULT_MAX_BATCH))
        max_bytes = int(
            os.environ.get(ENV_MAX_IMAGE_BYTES)
            or config.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES)
        )
        max_pixels = int(
            os.environ.get(ENV_MAX_IMAGE_PIXELS) or config.get("max_image_pixels", MAX_PIXELS)
        )
        from transfer.data.images import set_pixel_limit

        set_pixel_limit(max_pixels)  # PIL's decompression-bomb guard, explicit
        device = os.environ.get(ENV_DEVICE, "auto")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_dir(
            context.artifacts[MODEL_DIR_ARTIFACT],
            max_batch=max_batch,
            max_image_bytes=max_bytes,
            device=device,
            max_pixels=max_pixels,
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        try:
            rows = dataframe_to_rows(model_input, self.predictor.max_batch)
            results = self.predictor.predict(rows)
        except MlflowException:
            raise
        except InputError as error:
            raise ServingInputError(str(error)) from None
        except Exception as error:  # a server fault: log the traceback here, answer 500 without it
            log.exception("prediction failed")
            raise MlflowException(
                f"internal error while predicting: {type(error).__name__}",
                error_code=INTERNAL_ERROR,
            ) from error
        return pd.DataFrame(results, columns=["label", "probability", "probabilities"])


def input_example(rows: int = 2) -> pd.DataFrame:
    """A request of ``rows`` small PNGs (any size works: the model resizes), shown in the UI."""
    import base64
    import io

    from PIL import Image

    images = []
    for shade in range(rows):
        buffer = io.BytesIO()
        Image.new("L", (8, 8), color=64 + 64 * (shade % 3)).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pd.DataFrame({IMAGE_COLUMN: images})


def pip_requirements() -> list[str]:
    """The served model's dependencies, pinned to this environment (no slow inference)."""
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def transfer_package_dir() -> Path:
    import transfer

    return Path(transfer.__file__).resolve().parent


def log_pyfunc_model(
    model_dir: str | Path,
    name: str = "model",
    registered_model_name: str | None = None,
    *,
    run_id: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    await_registration_for: int = 300,
) -> ModelInfo:
    """Log the saved model dir as a served pyfunc (and register it when a name is given).

    ``run_id`` attaches the model to that run (else the active run, else no run); the limits
    become the model config, overridable at serve time through ``TRANSFER_SERVE_*``.
    """
    model_dir = Path(model_dir)
    for required in ("model.pt", "model.json"):
        if not (model_dir / required).is_file():
            raise InputError(f"{model_dir} is not a saved model dir: {required} is missing")
    model_id = None
    if run_id:
        # Model.log files a run-less model under the *current* experiment; create the logged
        # model in the run's experiment instead, so it sits beside the run in the UI.
        experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
        model_id = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, experiment_id=experiment_id
        ).model_id
    return mlflow.models.Model.log(
        artifact_path=None,  # deprecated in MLflow 3 but still positional: ``name`` is used
        name=name,
        flavor=mlflow.pyfunc,
        flavor_name="pyfunc.ModelFromCode",
        run_id=run_id,
        model_id=model_id,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        python_model=str(Path(__file__).resolve()),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir.resolve())},
        code_paths=[str(transfer_package_dir())],
        model_config={"max_batch": int(max_batch), "max_image_bytes": int(max_image_bytes)},
        signature=SIGNATURE,
        input_example=input_example(),  # two rows: the batch dimension stays free
        pip_requirements=pip_requirements(),
    )


# Model from code: when MLflow loads this file (as ``code_model_<hex>``, not as the package
# module ``tasks.adapters.pyfunc_model``) it takes the model object set here.
if __name__ != "tasks.adapters.pyfunc_model":
    mlflow.models.set_model(TransferPyfuncModel())
