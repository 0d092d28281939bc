"""Zero-shot classification of unseen classes through a class-embedding space.

ConSE (Norouzi et al. 2014): a classifier trained on *seen* classes gives p(seen | x);
the image is embedded as the convex combination of the top-T seen-class embeddings,
weighted by their (renormalised) probabilities, and labelled with the nearest *unseen*
class embedding by cosine similarity. An alternative, direct attribute regression
(in the spirit of DAP, Lampert et al. 2009), maps body features to attributes with ridge
regression and takes the nearest unseen class the same way.

Class embeddings are attribute vectors: ``dict[class_name, list[float]]``; for digits a
hand-made stroke-attribute table, :data:`DIGIT_ATTRIBUTES`, is built in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.config import FinetuneParams
from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.feature_cache import FeatureCache, compute_features, train_head_on_features
from transfer.techniques.multitask import digit_value
from transfer.train import seed_everything

# Stroke attributes of the ten digits as usually written (0 = no, 1 = yes, 0.5 = often).
DIGIT_ATTRIBUTE_NAMES = (
    "closed_loops",         # number of enclosed regions
    "vertical_stroke",      # a straight vertical line
    "horizontal_bar",       # a straight horizontal line
    "diagonal_stroke",      # a straight slanted line
    "curve_top",            # a rounded upper part
    "curve_bottom",         # a rounded lower part
    "open_left",            # a stroke opening towards the left
    "open_right",           # a stroke opening towards the right
    "loop_top",             # an enclosed region in the upper half
    "loop_bottom",          # an enclosed region in the lower half
)
DIGIT_ATTRIBUTES: dict[str, list[float]] = {
    #     loops vert  horiz diag  c_top c_bot op_l  op_r  l_top l_bot
    "0": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
    "1": [0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    "2": [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    "3": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    "4": [0.5, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
    "5": [0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
    "6": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0],
    "7": [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    "8": [2.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
    "9": [1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
}

Method = Literal["conse", "attributes"]


def class_embeddings(
    classes: Sequence[str], table: Mapping[str, Sequence[float]] | None = None
) -> Tensor:
    """(K, D) embedding per class name; without ``table`` the digit table (by digit value)."""
    if table is None:
        table = DIGIT_ATTRIBUTES
        rows = [table.get(str(digit_value(c))) for c in classes]
    else:
        rows = [table.get(c) for c in classes]
    missing = [c for c, row in zip(classes, rows, strict=True) if row is None]
    if missing:
        raise TransferError(f"no class embedding for class(es) {missing}")
    lengths = {len(row) for row in rows}  # type: ignore[arg-type]
    if len(lengths) != 1:
        raise TransferError(f"class embeddings have different lengths {sorted(lengths)}")
    return torch.tensor(rows, dtype=torch.float32)


def conse_embed(probs_seen: Tensor, seen_embeddings: Tensor, top_t: int = 3) -> Tensor:
    """ConSE image embedding (N, D): ``sum_t p_t s_t / sum_t p_t`` over the top-T seen classes.

    ``probs_seen``: (N, S) probabilities over the seen classes; ``seen_embeddings``: (S, D).
    """
    t = max(1, min(top_t, probs_seen.shape[1]))
    top_p, top_i = probs_seen.topk(t, dim=1)  # (N, T), (N, T)
    weights = top_p / top_p.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (N, T), rows sum to 1
    return torch.einsum("nt,ntd->nd", weights, seen_embeddings[top_i])  # (N, D)


def nearest_class(embedded: Tensor, class_emb: Tensor, center: Tensor | None = None) -> Tensor:
    """(N,) index of the most cosine-similar row of ``class_emb`` (K, D) for each (N, D) row.

    ``center`` (D,) is subtracted from both sides first; attribute vectors are all >= 0,
    so without centring every cosine is high and the ranking is less sharp.
    """
    if center is not None:
        embedded, class_emb = embedded - center, class_emb - center
    sims = F.normalize(embedded, dim=1) @ F.normalize(class_emb, dim=1).T  # (N, K)
    return sims.argmax(dim=1)


def conse_predict(
    probs_seen: Tensor,
    seen_embeddings: Tensor,
    unseen_embeddings: Tensor,
    top_t: int = 3,
    center: bool = True,
) -> Tensor:
    """ConSE: (N,) index into the unseen classes; centre = mean of all class embeddings."""
    mean = torch.cat([seen_embeddings, unseen_embeddings]).mean(dim=0) if center else None
    return nearest_class(conse_embed(probs_seen, seen_embeddings, top_t), unseen_embeddings, mean)


def fit_attribute_regressor(
    feats: Tensor, labels: Tensor, class_emb: Tensor, ridge: float = 1.0
) -> Tensor:
    """Ridge regression features (N, F) -> attributes of their class (N, D); returns W (F+1, D)."""
    x = torch.cat([feats, torch.ones(len(feats), 1)], dim=1).double()  # (N, F+1), bias column
    y = class_emb[labels].double()  # (N, D)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    eye[-1, -1] = 0.0  # do not shrink the bias
    return torch.linalg.solve(x.T @ x + ridge * eye, x.T @ y).float()  # (F+1, D)


def predict_attributes(weights: Tensor, feats: Tensor) -> Tensor:
    """(N, D) attributes predicted by :func:`fit_attribute_regressor` weights."""
    return torch.cat([feats, torch.ones(len(feats), 1)], dim=1) @ weights


def attribute_classifier(
    feats_seen: Tensor,
    labels_seen: Tensor,
    seen_embeddings: Tensor,
    feats_test: Tensor,
    unseen_embeddings: Tensor,
    ridge: float = 1.0,
    center: bool = True,
) -> Tensor:
    """Direct attribute prediction: ridge regression on seen classes, nearest unseen class (N,)."""
    w = fit_attribute_regressor(feats_seen, labels_seen, seen_embeddings, ridge)
    mean = torch.cat([seen_embeddings, unseen_embeddings]).mean(dim=0) if center else None
    return nearest_class(predict_attributes(w, feats_test), unseen_embeddings, mean)


def zero_shot_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of (N,) predictions against (N,) labels (both index the unseen classes)."""
    if len(labels) == 0:
        raise TransferError("no test images of unseen classes")
    return (predictions.cpu() == labels.cpu()).float().mean().item()


def chance_level(n_unseen: int) -> float:
    """Accuracy of guessing uniformly among the unseen classes."""
    if n_unseen < 1:
        raise TransferError("zero-shot needs at least one unseen class")
    return 1.0 / n_unseen


def split_seen_unseen(
    data: ImageTensors, unseen_classes: Sequence[str]
) -> tuple[ImageTensors, ImageTensors]:
    """Two datasets with re-indexed labels: seen classes only, unseen classes only."""
    unknown = sorted(set(unseen_classes) - set(data.classes))
    if unknown:
        raise TransferError(f"unseen class(es) {unknown} are not among {data.classes}")
    unseen = [c for c in data.classes if c in set(unseen_classes)]
    seen = [c for c in data.classes if c not in set(unseen_classes)]
    if not seen or not unseen:
        raise TransferError("zero-shot needs at least one seen and one unseen class")
    return _only(data, seen), _only(data, unseen)


def _only(data: ImageTensors, classes: list[str]) -> ImageTensors:
    remap = torch.full((len(data.classes),), -1, dtype=torch.int64)
    for new, name in enumerate(classes):
        remap[data.classes.index(name)] = new
    keep = (data.labels >= 0) & (remap[data.labels.clamp_min(0)] >= 0)
    index = keep.nonzero().flatten()
    return ImageTensors(data.images[index], remap[data.labels[index]], list(classes))


def run_zero_shot(
    source_model: nn.Module,
    target_train: ImageTensors,
    target_test: ImageTensors,
    unseen_classes: Sequence[str],
    params: FinetuneParams,
    device: torch.device,
    seed: int,
    attributes: Mapping[str, Sequence[float]] | None = None,
    method: Method = "conse",
    top_t: int = 3,
    cache: FeatureCache | None = None,
    cache_key_prefix: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Zero-shot on the target: train on seen classes, classify images of ``unseen_classes``.

    The source body stays frozen; its features (cached when ``cache`` is given, keyed by
    ``cache_key_prefix`` + split) feed a new linear head over the seen classes trained with
    ``params`` (epochs, lr, batch size, weight decay; no augmentation). ``method="conse"``
    combines that head's probabilities with the class embeddings; ``"attributes"`` regresses
    attributes from features. Returns ``({accuracy, chance, method, seen_classes,
    unseen_classes, n_test, predictions}, history of the seen-class head)``.
    """
    seen_train, _ = split_seen_unseen(target_train, unseen_classes)
    _, unseen_test = split_seen_unseen(target_test, unseen_classes)
    seen_emb = class_embeddings(seen_train.classes, attributes)  # (S, D)
    unseen_emb = class_embeddings(unseen_test.classes, attributes)  # (U, D)
    body = copy.deepcopy(source_model.body).eval()

    def features(data: ImageTensors, split: str) -> Tensor:
        if cache is None:
            return compute_features(body, data, device)
        return cache.get_or_compute(body, data, f"{cache_key_prefix}|zeroshot|{split}", device)

    feats_train = features(seen_train, "seen-train")  # (N_s, F)
    feats_test = features(unseen_test, "unseen-test")  # (N_u, F)
    history: list[dict[str, Any]] = []
    if method == "conse":
        seed_everything(seed)
        head = nn.Linear(feats_train.shape[1], len(seen_train.classes))
        history = train_head_on_features(
            head, feats_train, seen_train.labels, None, None, params, seed, device
        )
        with torch.no_grad():
            probs = head.eval()(feats_test.to(device)).softmax(dim=1).cpu()  # (N_u, S)
        predictions = conse_predict(probs, seen_emb, unseen_emb, top_t)
    elif method == "attributes":
        predictions = attribute_classifier(
            feats_train, seen_train.labels, seen_emb, feats_test, unseen_emb
        )
    else:
        raise TransferError(f"zero-shot method must be 'conse' or 'attributes', got {method!r}")
    result = {
        "method": method,
        "accuracy": zero_shot_accuracy(predictions, unseen_test.labels),
        "chance": chance_level(len(unseen_test.classes)),
        "seen_classes": seen_train.classes,
        "unseen_classes": unseen_test.classes,
        "n_test": len(unseen_test),
        "top_t": top_t,
        "predictions": predictions.tolist(),
    }
    return result, history
