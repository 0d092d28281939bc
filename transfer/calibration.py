"""Temperature scaling (Guo et al., ICML 2017): one scalar T fitted on the selection split.

Dividing the logits by T > 1 softens over-confident probabilities without changing any
prediction (the arg-max is invariant), so accuracy is untouched and only calibration moves.
T is fitted by minimising the validation negative log-likelihood (scipy's bounded scalar
minimiser over log T) and stored in the model's meta, so evaluation and the served model
apply the same T.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

# T outside [1/20, 20] means the validation split is too small or degenerate to trust
LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))


def _log_probs(probs: Any) -> Tensor:
    p = torch.as_tensor(probs, dtype=torch.float64)
    return p.clamp_min(1e-12).log()  # = logits minus a per-row constant: same softmax(z / T)


def apply_temperature(probs: Any, temperature: float) -> Tensor:
    """Probabilities (N, K) -> softmax(log p / T): the same as softmax(logits / T)."""
    if temperature == 1.0:
        return torch.as_tensor(probs, dtype=torch.float32)
    return torch.softmax(_log_probs(probs) / temperature, dim=1).float()


def nll(probs: Any, labels: Any, temperature: float = 1.0) -> float:
    log_p = torch.log_softmax(_log_probs(probs) / temperature, dim=1)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return float(torch.nn.functional.nll_loss(log_p, y))


def fit_temperature(probs: Any, labels: Any) -> float:
    """The T minimising the NLL of ``labels`` under softmax(log probs / T); 1.0 if no data."""
    y = torch.as_tensor(labels, dtype=torch.int64)
    if y.numel() == 0:
        return 1.0
    log_p = _log_probs(probs)

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(log_p / np.exp(log_t), y))

    result = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))
