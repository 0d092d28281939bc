"""Progressive networks (Rusu et al. 2016): a new column per task, lateral links, no forgetting.

The source ``TransferNet`` becomes a frozen *column* (parameters never trained, always in
eval mode, so its outputs stay bit-identical). A second column with the same stages is
trained for the target task; after every stage, a lateral adapter feeds the source
column's activation into the target column:

    h_t[i] = stage_t[i](h_t[i-1]) + A[i](h_s[i])     A[i]: 1x1 conv (B, C_i, H_i, W_i)
    f_t    = neck_t(pool(h_t[-1])) + A_f(f_s)         A_f: linear (B, F)
    logits = head_t(f_t)                              (B, K_target)

Adapters start at zero, so before training the target column computes exactly what its
initial weights compute. Unlike the paper (random init), the target column starts from a
copy of the source weights by default (``init="source"``): with a few labels per class a
random column learns little; ``init="random"`` gives the paper's setting.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from transfer.errors import TransferError
from transfer.techniques._common import TechniqueInputs
from transfer.train import fit, seed_everything

Task = Literal["target", "source"]


def _stages(column: nn.Module) -> list[nn.Module]:
    body = getattr(column, "body", None)
    stages = getattr(body, "stages", None)
    if not isinstance(stages, nn.Sequential) or not hasattr(body, "pool"):
        raise TransferError(
            f"{type(column).__name__} is not a TransferNet with body.stages/pool/neck "
            "(see transfer.models.Body)"
        )
    return list(stages.children())


def _zero_adapter(shape: torch.Size) -> nn.Module:
    """1x1 conv for (B, C, H, W) activations, linear for (B, F); weights start at zero."""
    if len(shape) == 4:
        adapter: nn.Module = nn.Conv2d(shape[1], shape[1], kernel_size=1)
    elif len(shape) == 2:
        adapter = nn.Linear(shape[1], shape[1])
    else:
        raise TransferError(f"no lateral adapter for activations of shape {tuple(shape)}")
    for p in adapter.parameters():
        nn.init.zeros_(p)
    return adapter


def _reinitialise(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


class ProgressiveNet(nn.Module):
    """A frozen source column + a trainable target column joined by lateral adapters.

    ``source_column``: a ``TransferNet`` (body with ``stages``/``pool``/``neck``, ``head``).
    ``input_shape``: (C, H, W) of the images, used once to size the adapters.
    ``forward(x, task="target")`` gives target logits (B, K_target); ``task="source"`` the
    untouched source model's logits (B, K_source).
    """

    def __init__(
        self,
        source_column: nn.Module,
        num_target_classes: int,
        input_shape: tuple[int, int, int],
        init: Literal["source", "random"] = "source",
    ) -> None:
        super().__init__()
        _stages(source_column)
        self.source = copy.deepcopy(source_column)
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.source.eval()
        self.target = copy.deepcopy(source_column)
        if init == "random":
            _reinitialise(self.target)
        elif init != "source":
            raise TransferError(f"init must be 'source' or 'random', got {init!r}")
        self.target.reset_classifier(num_target_classes)
        for p in self.target.parameters():
            p.requires_grad_(True)
        shapes = self._source_shapes(input_shape)
        self.laterals = nn.ModuleList(_zero_adapter(s) for s in shapes[:-1])  # one per stage
        self.feature_lateral = _zero_adapter(shapes[-1])  # (B, F)
        self.num_classes = num_target_classes

    @classmethod
    def empty(
        cls,
        arch: str,
        num_source_classes: int,
        num_target_classes: int,
        input_shape: tuple[int, int, int],
    ) -> ProgressiveNet:
        """An untrained net of the right structure, to ``load_state_dict`` a saved one into."""
        from transfer.models import create_model

        column = create_model(arch, num_source_classes, in_channels=input_shape[0])
        return cls(column, num_target_classes, input_shape)

    @torch.no_grad()
    def _source_shapes(self, input_shape: tuple[int, int, int]) -> list[torch.Size]:
        x = torch.zeros(2, *input_shape)
        acts = self._source_activations(x)
        return [a.shape for a in acts]

    def _source_activations(self, x: Tensor) -> list[Tensor]:
        """Stage outputs of the source column, then its body features (B, F)."""
        acts, h = [], self.source.body.normalise(x)  # the weights' mean/std, if any
        for stage in _stages(self.source):
            h = stage(h)  # (B, C_i, H_i, W_i)
            acts.append(h)
        body = self.source.body
        acts.append(body.neck(body.pool(h)))  # (B, F)
        return acts

    def train(self, mode: bool = True) -> ProgressiveNet:
        """The source column stays in eval mode whatever the mode (fixed BatchNorm statistics)."""
        super().train(mode)
        self.source.eval()
        return self

    def target_features(self, x: Tensor) -> Tensor:
        with torch.no_grad():  # the source column is fixed: no graph through it
            source_acts = self._source_activations(x)
        h = self.target.body.normalise(x)
        stages = _stages(self.target)
        for stage, lateral, h_s in zip(stages, self.laterals, source_acts, strict=False):
            h = stage(h) + lateral(h_s)  # (B, C_i, H_i, W_i)
        body = self.target.body
        return body.neck(body.pool(h)) + self.feature_lateral(source_acts[-1])  # (B, F)

    def forward(self, x: Tensor, task: Task = "target") -> Tensor:
        if task == "source":
            return self.source(x)  # (B, K_source)
        if task != "target":
            raise TransferError(f"task must be 'target' or 'source', got {task!r}")
        return self.target.head(self.target.drop(self.target_features(x)))  # (B, K_target)


def run_progressive(
    source_model: nn.Module, inputs: TechniqueInputs
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a target column (+ adapters) next to the frozen source column."""
    train, params = inputs.train, inputs.params
    seed_everything(inputs.seed)
    shape = tuple(train.images.shape[1:])
    net = ProgressiveNet(source_model, train.num_classes, shape)  # type: ignore[arg-type]
    groups = [
        {"params": list(net.target.body.parameters()), "lr": params.lr * params.body_lr_mult,
         "name": "target-body"},
        {"params": list(net.target.head.parameters()), "lr": params.lr, "name": "head"},
        {"params": [*net.laterals.parameters(), *net.feature_lateral.parameters()], "lr": params.lr,
         "name": "laterals"},
    ]
    result = fit(
        net, train, inputs.val, params, device=inputs.device, seed=inputs.seed, param_groups=groups,
        progress=inputs.progress,
        desc="finetune (progressive)",
    )
    return net, [stats.as_dict() for stats in result.history]
