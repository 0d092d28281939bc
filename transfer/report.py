"""The transfer report: does transfer make sense here, and did it help?

Pure core (no MLflow, no Prefect): ``tasks/report.py`` gathers a pipeline run's records
into a plain ``data`` dict and calls :func:`build_report`, which writes

- ``report.html``: one self-contained page (CSS inline, every image an embedded base64
  PNG): summary, data sizes, the transfer-sense checks, the sample-efficiency curve,
  confusion matrices, a negative-transfer warning, the source model's provenance and
  the fine-tuning strategy with its reason;
- ``report.png``: a one-page figure (headline numbers + curve + both confusion matrices);
- ``sample_efficiency.png``, ``confusion_*.png`` and ``report.json`` (the data behind it).

The ``data`` dict (every key optional; a missing part shows as "not available")::

    title: str
    run: {run_id, run_name, status, start_time, experiment, git_commit}
    summary: {transfer_accuracy, scratch_accuracy, gain, negative_transfer_margin,
              strategy, strategy_reason, labels_per_class, model_name, model_version,
              promoted, promotion_reason, data_version: {source, target},
              data_version_kind: {source, target}, aliases_now: [str], champion_now}
    datasets: {source: dataset_summary(...), target: dataset_summary(...)}
    checks: [{check, passed, detail, level}]      # default: transfer_sense_checks(datasets)
    sample_efficiency: {curves: {strategy: {k: mean accuracy}}, notes: [str], epochs: int | None,
                        seeds: {strategy: {k: [acc]}}, val: {...}, floors: {floor: {k: [acc]}},
                        analysis: efficiency_analysis(...)}
    confusion: {transfer: {matrix, classes, accuracy}, scratch: {...}}
    source_model: {weights_sha256, origin, reused, initial_weights, source_data_version,
                   source_test_accuracy, arch, run_id, model_dir, recorded_weights_sha256}
    notes: [str]                                   # anything the gatherer could not find
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import numpy as np

# summaries and sense checks live in transfer.checks (shared with validation); re-exported
from transfer.checks import dataset_summary, transfer_sense_checks  # noqa: F401
from transfer import plots
from transfer.plots import plot_sample_efficiency  # noqa: F401  (re-exported: the report's API)
from transfer.stats import format_p
from transfer.config import Params, Strategy
from transfer.errors import TransferError

log = logging.getLogger(__name__)

SCRATCH = "scratch"
DEFAULT_KS = (1, 5, 10, 50)
DEFAULT_STRATEGIES = ("head", "full")
DEFAULT_SEEDS = 3  # seeds per sweep point: error bars and a paired t-test need more than one


# --------------------------------------------------------------------------- sample efficiency


class Curves(dict):
    """``curves[strategy][k]`` = mean test accuracy over seeds, with ``notes`` (skipped points),
    ``points`` (one per strategy, k, seed), ``seeds[strategy][k]`` and ``val[strategy][k]``
    (per-seed test / validation accuracies, seed order) and ``floors[floor][k]`` (per-seed
    test accuracies of the classical floors, same k-label subsets)."""

    def __init__(self, *args: Any, notes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[str] = list(notes or [])
        self.points: list[dict[str, Any]] = []
        self.seeds: dict[str, dict[int, list[float]]] = {}
        self.val: dict[str, dict[int, list[float]]] = {}
        self.floors: dict[str, dict[int, list[float]]] = {}
        self.seed_list: list[int] = []


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _accuracy_on(model_dir: Path, splits: Mapping[str, Any], device: Any) -> dict[str, float]:
    from transfer.models import load_model_dir
    from transfer.train import predict_proba

    model, meta = load_model_dir(model_dir)
    model.to(device)  # predict_proba moves the images, not the model
    out = {}
    for name, data in splits.items():
        if list(meta.get("classes", data.classes)) != list(data.classes):
            raise TransferError(
                f"{model_dir} knows classes {meta.get('classes')}, the {name} split {data.classes}"
            )
        probs = predict_proba(model, data, device)
        out[name] = float((probs.argmax(dim=1) == data.labels).float().mean())
    return out


def _check_strategies(strategies: Sequence[str]) -> list[str]:
    known = set(get_args(Strategy)) | {SCRATCH}
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise TransferError(f"unknown strategies {unknown}; known: {', '.join(sorted(known))}")
    return list(dict.fromkeys(strategies))


def sample_efficiency(
    params: Params,
    source_model_dir: str | Path,
    ks: Sequence[int] = DEFAULT_KS,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    work_dir: str | Path = "artifacts/report/sweep",
    progress: bool = False,
    *,
    epochs: int | None = None,
    include_scratch: bool = True,
    keep_models: bool = False,
    on_point: Callable[[str, int, float], None] | None = None,
    seeds: Sequence[int] | None = None,
    floors: bool = True,
) -> Curves:
    """Test accuracy vs labels per class over seeds, from scratch and for each strategy.

    Every point trains with ``params`` except ``finetune.labels_per_class = k``,
    ``runtime.seed = seed`` (the k-label subset and the init; default: ``[runtime.seed]``)
    and ``finetune.epochs = epochs`` when given, for a quick sweep. Each is scored on the
    target validation split (what choices use) and the fixed test split (what is shown).
    With ``floors`` the classical floors (``transfer.baselines``) train on the same k-label
    subsets. A k larger than the smallest class of the target train split is skipped with a
    note. Points are cached under ``work_dir`` by a key of everything that determines them,
    so a second report of the same run trains nothing.
    """
    from transfer import stages
    from transfer.data import dataset_version, load_split
    from transfer.models import load_model_dir
    from transfer.train import resolve_device

    names = _check_strategies(strategies)
    if include_scratch and SCRATCH not in names:
        names = [SCRATCH, *names]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise TransferError(f"labels per class must be >= 1, got {ks}")
    seed_list = list(dict.fromkeys(int(s) for s in (seeds if seeds else [params.runtime.seed])))
    target_dir = stages.dataset_dirs(params)["target"]
    size, channels = params.data.image_size, params.data.channels
    counts = load_split(target_dir, "train", size, channels).class_counts()
    eval_splits = {name: load_split(target_dir, name, size, channels) for name in ("test", "val")}
    eval_splits = {name: data for name, data in eval_splits.items() if len(data)}
    smallest = min(counts.values()) if counts else 0
    _, source_meta = load_model_dir(source_model_dir)
    device = resolve_device(params.runtime.device)
    curves = Curves()
    curves.seed_list = seed_list
    usable = [k for k in ks if k <= smallest]
    for k in ks:
        if k > smallest:
            tight = min(counts, key=counts.get) if counts else "?"
            curves.notes.append(
                f"k={k} skipped: class '{tight}' holds only {smallest} training images"
            )
    base = {
        "target": dataset_version(target_dir),
        "arch": params.pretrain.arch,
        "size": size,
        "channels": channels,
    }
    for name in names:
        for k in usable:
            try:
                for seed in seed_list:
                    p = params.model_copy(deep=True)
                    p.finetune.labels_per_class = k
                    p.runtime.seed = seed
                    p.data.seed = seed  # the k-label draw (target_splits) varies with the seed too
                    if epochs is not None:
                        p.finetune.epochs = epochs
                    source_sha = None if name == SCRATCH else source_meta.get("weights_sha256")
                    key = _key({**base, "seed": seed}, name, p.finetune.model_dump(mode="json"), source_sha)
                    point_dir = Path(work_dir) / f"{name}-k{k}-s{seed}-{key}"
                    acc, seconds, cached = _point(
                        stages, p, name, source_model_dir, point_dir, eval_splits, device, progress,
                        keep_models,
                    )
                    curves.seeds.setdefault(name, {}).setdefault(k, []).append(acc["test"])
                    if "val" in acc:
                        curves.val.setdefault(name, {}).setdefault(k, []).append(acc["val"])
                    curves.points.append(
                        {"strategy": name, "k": k, "seed": seed, "accuracy": acc["test"],
                         "val_accuracy": acc.get("val"), "seconds": seconds, "cached": cached}
                    )
                    log.info("sample efficiency: %s k=%d seed=%d -> %.4f (%.1fs%s)", name, k, seed,
                             acc["test"], seconds, ", cached" if cached else "")
            except TransferError as error:
                curves.notes.append(f"{name} skipped from k={k} on: {error}")
                curves.seeds.get(name, {}).pop(k, None)
                curves.val.get(name, {}).pop(k, None)
                break
            curves.setdefault(name, {})[k] = float(np.mean(curves.seeds[name][k]))
            if on_point is not None:
                on_point(name, k, curves[name][k])
    if floors:
        _floors(curves, stages, params, usable, seed_list, eval_splits["test"])
    return curves


def _floors(curves: Curves, stages: Any, params: Params, ks: Sequence[int], seeds: Sequence[int],
            test: Any) -> None:
    """Logistic regression, RBF SVC, LabelSpreading on raw pixels, same k-label subsets."""
    from transfer.baselines import classical_floors

    for k in ks:
        for seed in seeds:
            p = params.model_copy(deep=True)
            p.finetune.labels_per_class, p.runtime.seed = k, seed
            p.data.seed = seed  # the k-label draw (target_splits) varies with the seed too
            try:
                train = stages.target_splits(p)["train"]
                result = classical_floors(train, test, stages.unlabelled_target(p), seed=seed)["test"]
            except (TransferError, ValueError) as error:
                curves.notes.append(f"classical floors skipped at k={k}: {error}")
                break
            for name, floor in result.items():
                curves.floors.setdefault(name, {}).setdefault(k, []).append(floor.accuracy)


def _point(
    stages: Any,
    params: Params,
    name: str,
    source_model_dir: str | Path,
    point_dir: Path,
    splits: Mapping[str, Any],
    device: Any,
    progress: bool,
    keep_models: bool,
) -> tuple[dict[str, float], float, bool]:
    result_file = point_dir / "result.json"
    if result_file.exists():
        cached = json.loads(result_file.read_text())
        acc = {"test": float(cached["accuracy"])}
        if cached.get("val_accuracy") is not None:
            acc["val"] = float(cached["val_accuracy"])
        return acc, float(cached["seconds"]), True
    started = time.perf_counter()
    if name == SCRATCH:
        trained = stages.train_scratch(params, point_dir, progress=progress)
    else:
        strategy = None if name == "auto" else name
        trained = stages.finetune(
            params, source_model_dir, point_dir, strategy=strategy, progress=progress
        )
    acc = _accuracy_on(Path(trained.model_dir), splits, device)
    seconds = time.perf_counter() - started
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(
        json.dumps(
            {
                "strategy": name,
                "resolved_strategy": trained.strategy,
                "k": params.finetune.labels_per_class,
                "seed": params.runtime.seed,
                "epochs": params.finetune.epochs,
                "accuracy": acc["test"],
                "val_accuracy": acc.get("val"),
                "seconds": seconds,
            },
            indent=2,
        )
    )
    if not keep_models:
        for sub in ("model", "checkpoints"):
            shutil.rmtree(point_dir / sub, ignore_errors=True)
    return acc, seconds, False


def efficiency_analysis(
    seeds: Mapping[str, Mapping[Any, Sequence[float]]],
    val: Mapping[str, Mapping[Any, Sequence[float]]] | None = None,
    floors: Mapping[str, Mapping[Any, Sequence[float]]] | None = None,
    default_k: int | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Mean and 95% t-interval per point, gains over scratch (paired t across seeds), the
    "labels saved" statement, where the gain stops being significant, and the floors.

    The strategy behind the statements is the one with the best mean VALIDATION accuracy at
    ``default_k`` (test means when no val figures were recorded, said so in ``basis``).
    """
    from transfer import efficiency as eff
    from transfer.stats import over_seeds

    grid = {n: {int(k): list(v) for k, v in row.items()} for n, row in seeds.items()}
    vgrid = {n: {int(k): list(v) for k, v in row.items()} for n, row in (val or {}).items()}
    fgrid = {n: {int(k): list(v) for k, v in row.items()} for n, row in (floors or {}).items()}
    out: dict[str, Any] = {
        "summary": {n: {k: over_seeds(v).to_json() for k, v in row.items()} for n, row in grid.items()},
        "floors": {n: {k: over_seeds(v).to_json() for k, v in row.items()} for n, row in fgrid.items()},
        "gains": {n: {k: g.to_json() | {"significant": g.better(alpha)} for k, g in row.items()}
                  for n, row in eff.gains_over_scratch(grid).items()},
        "n_seeds": max((len(v) for row in grid.values() for v in row.values()), default=0),
    }
    strategies = [n for n in grid if n != SCRATCH]
    ks = sorted({k for row in grid.values() for k in row})
    if not strategies or SCRATCH not in grid or not ks:
        return out
    k0 = int(default_k) if default_k is not None and int(default_k) in grid[strategies[0]] else None
    basis = "validation" if vgrid else "test (no validation figures)"
    chooser = {n: vgrid[n] for n in strategies if n in vgrid} if vgrid else {n: grid[n] for n in strategies}
    best = {k: eff.best_by_val(chooser, k, exclude=()) for k in ks}
    out["best"], out["basis"] = best, basis
    gains = eff.gains_over_scratch(grid)
    best_gains = {k: gains[best[k]][k] for k in ks if best[k] in gains and k in gains[best[k]]}
    out["gain_stops_significant"] = eff.gain_stops_significant(best_gains, alpha)
    if k0 is None:
        out["labels_saved"] = {"text": f"the default k={default_k} is not in the sweep: no labels-saved figure"}
    else:
        transfer = float(np.mean(grid[best[k0]][k0]))
        out["labels_saved"] = eff.labels_saved(eff.means({SCRATCH: grid[SCRATCH]})[SCRATCH], transfer, k0)
        out["labels_saved"]["strategy"] = best[k0]
    verdicts = {}
    for k in ks:
        if best[k] is None or k not in grid[best[k]]:
            continue
        paired = {f: eff.seed_gain(grid[best[k]][k], row[k]) for f, row in fgrid.items()
                  if k in row and len(row[k]) == len(grid[best[k]][k])}
        missed = [f for f, g in paired.items() if not g.better(alpha)]
        verdicts[k] = {"strategy": best[k], "beats_all": bool(paired) and not missed, "not_beaten": missed,
                       "vs": {f: g.to_json() for f, g in paired.items()}}
    out["floor_verdicts"] = verdicts
    return out


def negative_points(curves: Mapping[str, Mapping[Any, float]], margin: float = 0.0) -> list[str]:
    """Where a transfer strategy scores below scratch at the same k (minus ``margin``)."""
    scratch = {int(k): v for k, v in (curves.get(SCRATCH) or {}).items()}
    out = []
    for name, curve in curves.items():
        if name == SCRATCH:
            continue
        for k, acc in sorted((int(k), v) for k, v in curve.items()):
            if k in scratch and acc < scratch[k] - margin:
                out.append(
                    f"k={k}: {name} {acc:.3f} < scratch {scratch[k]:.3f} ({acc - scratch[k]:+.3f})"
                )
    return out


# --------------------------------------------------------------------------- report data


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return str(value)


def negative_transfer(summary: Mapping[str, Any]) -> bool | None:
    """Scratch significantly better on the paired test (the run's verdict); runs without one:
    ``gain < -margin``. None when there is no scratch baseline to compare with."""
    if summary.get("gain_verdict"):
        return str(summary["gain_verdict"]).startswith("negative transfer")
    gain = summary.get("gain")
    if gain is None:
        t, s = summary.get("transfer_accuracy"), summary.get("scratch_accuracy")
        if t is None or s is None:
            return None
        gain = float(t) - float(s)
    return float(gain) < -float(summary.get("negative_transfer_margin") or 0.0)


def _ci(interval: Sequence[float] | None, sign: bool = False) -> str:
    """`` [0.941, 0.969]``: a 95% interval after a figure (empty for runs that logged none)."""
    if not interval:
        return ""
    fmt = "{:+.3f}" if sign else "{:.3f}"
    return html.escape(f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]")


def _gain(summary: Mapping[str, Any]) -> float | None:
    if summary.get("gain") is not None:
        return float(summary["gain"])
    t, s = summary.get("transfer_accuracy"), summary.get("scratch_accuracy")
    return None if t is None or s is None else float(t) - float(s)


def _run_point(data: Mapping[str, Any]) -> dict[str, Any] | None:
    summary = data.get("summary") or {}
    if not summary.get("labels_per_class"):
        return None
    return {
        "k": summary["labels_per_class"],
        "strategy": summary.get("strategy"),
        "transfer_accuracy": summary.get("transfer_accuracy"),
        "scratch_accuracy": summary.get("scratch_accuracy"),
    }


def _checks(data: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    if data.get("checks") is not None:
        return list(data["checks"])
    datasets = data.get("datasets") or {}
    if datasets.get("source") and datasets.get("target"):
        return transfer_sense_checks(datasets["source"], datasets["target"])
    return None


# --------------------------------------------------------------------------- HTML

CSS = """
:root { --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; --info:#0969da; --muted:#57606a;
        --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:#1f2328;
       max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; background:#fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; border-bottom: 1px solid var(--line); padding-bottom: 6px; margin-top: 36px; }
.sub, .muted { color: var(--muted); font-size: 13px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background:#f6f8fa;
       padding: 1px 4px; border-radius: 4px; word-break: break-all; }
table { border-collapse: collapse; width: 100%; margin: 10px 0; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 6px 9px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
               letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; }
.pos { color: var(--ok); } .neg { color: var(--bad); }
.badge { display: inline-block; min-width: 52px; text-align: center; font-size: 12px;
         font-weight: 700; border-radius: 10px; padding: 1px 8px; color: #fff; }
.badge.pass { background: var(--ok); } .badge.fail { background: var(--bad); }
.badge.warn { background: var(--warn); } .badge.info { background: var(--info); }
.banner { border-radius: 8px; padding: 12px 16px; margin: 16px 0; border: 1px solid; }
.banner.danger { background: #ffebe9; border-color: #ff8182; color: #82071e; }
.banner.good { background: #dafbe1; border-color: #4ac26b; color: #044f1e; }
.banner.note { background: #fff8c5; border-color: #d4a72c; color: #4d2d00; }
.figs { display: flex; flex-wrap: wrap; gap: 18px; }
.figs figure { margin: 0; flex: 1 1 420px; }
img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; }
dl.kv { display: grid; grid-template-columns: 220px 1fr; gap: 4px 14px; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
ul.notes li { margin: 2px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(_f(value))


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _img(path: str | Path, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_data_uri(path)}" alt="{html.escape(alt)}">{cap}</figure>'


def _na(what: str) -> str:
    return f'<p class="muted">{html.escape(what)}: not available.</p>'


def _card(label: str, value: str, cls: str = "") -> str:
    return (
        f'<div class="card"><div class="label">{html.escape(label)}</div>'
        f'<div class="value {cls}">{value}</div></div>'
    )


def _kv(items: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{v}</dd>" for k, v in items)
    return f'<dl class="kv">{rows}</dl>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def version_state(summary: Mapping[str, Any]) -> str:
    """`` (promoted)``, `` (not promoted)`` at the run, checked against the registry now
    (``aliases_now``, ``champion_now``): a rolled-back champion no longer reads as promoted."""
    promoted = summary.get("promoted")
    at_run = "" if promoted is None else (" (promoted)" if promoted else " (not promoted)")
    if "aliases_now" not in summary or not promoted:
        return at_run
    if "champion" in summary["aliases_now"]:
        return at_run
    champion = summary.get("champion_now")
    now = f"champion is now v{champion}" if champion else "no champion now"
    return f" (promoted, no longer champion: {now})"


def _summary_html(data: Mapping[str, Any]) -> str:
    s = data.get("summary") or {}
    gain = _gain(s)
    gain_cls = "" if gain is None else ("pos" if gain >= 0 else "neg")
    version = f"v{s['model_version']}" if s.get("model_version") not in (None, "") else "n/a"
    cards = "".join(
        [
            _card("transfer accuracy", _e(s.get("transfer_accuracy")) + _ci(s.get("transfer_accuracy_ci"))),
            _card("scratch accuracy", _e(s.get("scratch_accuracy")) + _ci(s.get("scratch_accuracy_ci"))),
            _card("gain over scratch", html.escape(_f(gain, sign=True)) + _ci(s.get("gain_ci"), sign=True)
                  + (f" p = {html.escape(format_p(s['gain_p_value']))}" if s.get("gain_p_value") is not None else ""),
                  gain_cls),
            _card("strategy", _e(s.get("strategy"))),
            _card("labels per class", _e(s.get("labels_per_class"))),
            _card("model version", html.escape(f"{version}{version_state(s)}")),
        ]
    )
    negative = negative_transfer(s)
    margin = float(s.get("negative_transfer_margin") or 0.0)
    if negative:
        banner = (
            f'<div class="banner danger" id="negative-transfer-warning" role="alert"><strong>'
            f"Negative transfer:</strong> the fine-tuned model scores "
            f"{_e(s.get('transfer_accuracy'))}, below the same budget trained from scratch "
            f"({_e(s.get('scratch_accuracy'))}; gain {html.escape(_f(gain, sign=True))}, "
            f"negative-transfer margin {margin:g}). The source features hurt this target: check "
            "the transfer-sense checks, try another strategy or drop the source.</div>"
        )
    elif negative is None:
        banner = (
            '<div class="banner note">No scratch baseline recorded: '
            "the transfer gain is unknown.</div>"
        )
    elif s.get("gain_verdict") and s["gain_verdict"] != "significant gain":
        banner = (
            f'<div class="banner note">{html.escape(str(s["gain_verdict"]).capitalize())}: '
            f"{html.escape(_f(gain, sign=True))}{_ci(s.get('gain_ci'), sign=True)} test accuracy over the "
            "same budget trained from scratch (paired on the same test images).</div>"
        )
    else:
        banner = (
            f'<div class="banner good">Transfer helped: {html.escape(_f(gain, sign=True))}'
            f"{_ci(s.get('gain_ci'), sign=True)} test accuracy over the same budget trained from scratch"
            + (f" (significant: McNemar p = {html.escape(format_p(s['gain_p_value']))})"
               if s.get("gain_p_value") is not None else "") + ".</div>"
        )
    extra = []
    if s.get("promotion_reason"):
        extra.append(("promotion", html.escape(str(s["promotion_reason"]))))
    versions, kinds = s.get("data_version") or {}, s.get("data_version_kind") or {}
    for name in ("source", "target"):
        if versions.get(name):
            kind = html.escape(kinds.get(name) or "version")
            extra.append(
                (f"{name} data version", f"<code>{html.escape(str(versions[name]))}</code> "
                 f'<span class="muted">({kind} of the {name} data this run read)</span>')
            )
    return banner + f'<div class="cards">{cards}</div>' + (_kv(extra) if extra else "")


def _size_text(summary: Mapping[str, Any]) -> str:
    w, h = summary.get("width"), summary.get("height")
    if not w or not h:
        return "n/a"
    text = f"{w['median']:g}x{h['median']:g}"
    if (w["min"], h["min"]) != (w["max"], h["max"]):
        text += f" ({w['min']}x{h['min']} .. {w['max']}x{h['max']})"
    return text


def _data_html(data: Mapping[str, Any]) -> str:
    datasets = data.get("datasets") or {}
    if not datasets:
        return _na("dataset manifests")
    head = (
        "<tr><th>dataset</th><th class=num>classes</th><th class=num>train</th>"
        "<th class=num>val</th>"
        "<th class=num>test</th><th class=num>unlabelled</th><th class=num>total</th>"
        "<th class=num>unreadable</th><th>image size (median)</th><th>channels / modes</th></tr>"
    )
    rows = []
    for name in ("source", "target"):
        d = datasets.get(name)
        if not d:
            rows.append(
                f"<tr><td>{name}</td><td colspan=9 class=muted>manifest not available</td></tr>"
            )
            continue
        sp = d.get("splits") or {}
        cells = [
            len(d.get("classes", [])),
            sp.get("train", 0),
            sp.get("val", 0),
            sp.get("test", 0),
            sp.get("unlabelled", 0),
            d.get("n_images", 0),
            d.get("n_unreadable", 0),
        ]
        nums = "".join(f"<td class=num>{c:,}</td>" for c in cells)
        rows.append(
            f"<tr><td><strong>{name}</strong></td>{nums}<td>{html.escape(_size_text(d))}</td>"
            f"<td>{html.escape(str(d.get('channels')))} / "
            f"{html.escape(', '.join(d.get('modes', [])))}</td></tr>"
        )
    body = f"<table>{head}{''.join(rows)}</table>"
    target = datasets.get("target") or {}
    if target.get("labelled_budget"):
        body += (
            "<p>Target labelled budget used for training: "
            f"<strong>{target['labels_per_class']}</strong> labels per class x "
            f"{len(target.get('classes', []))} classes = "
            f"<strong>{target['labelled_budget']:,}</strong> images (the rest of the train split "
            "is not used; the test split is fixed).</p>"
        )
    for name in ("source", "target"):
        d = datasets.get(name) or {}
        per_class = d.get("per_class") or {}
        if not per_class:
            continue
        splits = [
            s for s in ("train", "val", "test", "unlabelled") if (d.get("splits") or {}).get(s)
        ]
        header = "".join(f"<th class=num>{s}</th>" for s in splits)
        shown = list(per_class.items())[:60]
        lines = "".join(
            f"<tr><td>{html.escape(c)}</td>"
            + "".join(f"<td class=num>{n.get(s, 0):,}</td>" for s in splits)
            + "</tr>"
            for c, n in shown
        )
        more = (
            f"<p class=muted>... and {len(per_class) - len(shown)} more classes</p>"
            if len(per_class) > len(shown)
            else ""
        )
        body += (
            f"<details><summary>{name}: images per class and split</summary>"
            f"<table><tr><th>class</th>{header}</tr>{lines}</table>{more}</details>"
        )
    return body


def _level(check: Mapping[str, Any]) -> str:
    return str(check.get("level") or ("pass" if check.get("passed") else "fail"))


def _checks_html(checks: list[dict[str, Any]] | None) -> str:
    if checks is None:
        return _na("transfer-sense checks (need both dataset manifests)")
    rows = "".join(
        f'<tr><td><span class="badge {html.escape(_level(c))}">{html.escape(_level(c).upper())}'
        f"</span></td><td><code>{html.escape(str(c['check']))}</code></td>"
        f"<td>{html.escape(str(c['detail']))}</td></tr>"
        for c in checks
    )
    failed = [str(c["check"]) for c in checks if _level(c) == "fail"]
    verdict = (
        f'<div class="banner note">Transfer may not pay off here: {html.escape(", ".join(failed))} '
        "failed.</div>"
        if failed
        else ""
    )
    return (
        verdict + "<p>Transfer makes sense when source and target share the input kind, the source "
        "has far more data than the target budget, and low-level source features help.</p>"
        f"<table><tr><th>result</th><th>check</th><th>detail</th></tr>{rows}</table>"
    )


def _cell(mean: float, row: Mapping[str, Any] | None) -> str:
    if not row or int(len(row.get("values") or [])) < 2:
        return f"{mean:.3f}"
    low, high = max(float(row["ci_low"]), 0.0), min(float(row["ci_high"]), 1.0)  # accuracies live in [0, 1]
    return f"{mean:.3f} <span class=muted>[{low:.3f}, {high:.3f}]</span>"


def _efficiency_statements(analysis: Mapping[str, Any]) -> str:
    """Labels saved, where the gain stops being significant, and the floors verdict per k."""
    items = []
    saved = analysis.get("labels_saved") or {}
    if saved.get("text"):
        basis = analysis.get("basis", "validation")
        who = f" ({saved['strategy']}, best on {basis})" if saved.get("strategy") else ""
        items.append(f"<strong>Labels saved</strong>{html.escape(who)}: {html.escape(saved['text'])}.")
    stops = analysis.get("gain_stops_significant") or {}
    if stops.get("text"):
        items.append(f"<strong>Significance of the gain</strong> (best strategy per k, paired t-test "
                     f"across {analysis.get('n_seeds', '?')} seeds): {html.escape(stops['text'])}.")
    for k, v in sorted((analysis.get("floor_verdicts") or {}).items(), key=lambda kv: int(kv[0])):
        if not v.get("vs"):
            continue
        if v.get("beats_all"):
            verdict = "beats all three classical floors"
        else:
            missed = html.escape(", ".join(v.get("not_beaten") or []))
            verdict = f"does <strong>not</strong> beat {missed} significantly"
        detail = ", ".join(f"{html.escape(f)} {g['mean']:+.3f}" for f, g in v["vs"].items())
        items.append(f"k={int(k)}: {html.escape(str(v['strategy']))} {verdict} ({detail}).")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else ""


def _curve_html(data: Mapping[str, Any], curve_png: Path | None) -> str:
    se = data.get("sample_efficiency") or {}
    curves = plots.norm_curves(se.get("curves") or {})
    analysis = se.get("analysis") or {}
    summary = analysis.get("summary") or {}
    floors = analysis.get("floors") or {}
    if not curves:
        body = _na("sample-efficiency sweep")
    else:
        ks = sorted({k for pts in curves.values() for k, _ in pts})
        header = "".join(f"<th class=num>k={k}</th>" for k in ks)

        def row(name: str, pts: Mapping[int, float], spread: Mapping[Any, Any]) -> str:
            spread = {int(k): v for k, v in (spread or {}).items()}
            return f"<tr><td>{html.escape(name)}</td>" + "".join(
                f"<td class=num>{_cell(pts[k], spread.get(k))}</td>" if k in pts else "<td class=num>-</td>"
                for k in ks
            ) + "</tr>"

        rows = "".join(
            row(name, dict(pts), summary.get(name) or {})
            for name, pts in sorted(curves.items(), key=lambda kv: kv[0] != SCRATCH)
        )
        rows += "".join(
            row(f"floor: {name}", {int(k): float(v["mean"]) for k, v in frow.items()}, frow)
            for name, frow in floors.items()
        )
        epochs = se.get("epochs")
        n_seeds = analysis.get("n_seeds") or 1
        body = (
            _img(
                curve_png,
                "sample-efficiency curve",
                "Test accuracy vs labelled images per class: "
                "scratch (dashed), each fine-tuning strategy, classical floors (dotted); "
                "error bars: 95% interval over seeds; stars mark this run.",
            )
            if curve_png
            else ""
        )
        body += (
            f"<table><tr><th>strategy</th>{header}</tr>{rows}</table>"
            f"<p class=muted>Each point trains with this run's params except labels per class"
            f"{f' and epochs={epochs} (quick sweep)' if epochs is not None else ''}, "
            f"over {n_seeds} seed(s) (each draws the k-label subset and the init): mean test accuracy "
            "[95% t-interval over seeds] on the fixed target test split. Strategies are ranked on the "
            "validation split; floors are logistic regression, RBF SVC and LabelSpreading (with the "
            "unlabelled pool) on raw pixels, same k-label subsets.</p>"
        )
        body += _efficiency_statements(analysis)
        margin = float((data.get("summary") or {}).get("negative_transfer_margin") or 0.0)
        worse = negative_points(se.get("curves") or {}, margin)
        if worse:
            body += (
                '<div class="banner note"><strong>Scratch beats transfer at some budgets:'
                "</strong><ul>"
                + "".join(f"<li>{html.escape(w)}</li>" for w in worse)
                + "</ul></div>"
            )
    notes = list(se.get("notes") or [])
    if notes:
        body += (
            '<ul class="notes muted">'
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
            + "</ul>"
        )
    return body


def _calibration_html(data: Mapping[str, Any], png: Path | None) -> str:
    calibration = ((data.get("confusion") or {}).get("transfer") or {}).get("calibration") or {}
    if png is None or calibration.get("ece") is None:
        return _na("calibration (this run recorded no reliability table)")
    text = (f"<p>Expected calibration error on the test holdout: "
            f"{calibration['ece_uncalibrated']:.3f} before, <b>{calibration['ece']:.3f}</b> after temperature "
            f"scaling (T = {calibration['temperature']:.2f}, fitted on the validation split; the served "
            "model applies the same T, so its probabilities are the calibrated ones).</p>")
    return text + _img(png, "reliability diagrams", "bars: accuracy per confidence bin; diagonal: perfect calibration")


def _confusion_html(pngs: Mapping[str, Path]) -> str:
    if not pngs:
        return _na("confusion matrices")
    figs = "".join(
        _img(
            path,
            f"confusion matrix: {name}",
            f"{name}: rows = true class, colour = fraction of the true class, numbers = counts",
        )
        for name, path in pngs.items()
    )
    return f'<div class="figs">{figs}</div>'


def _provenance_html(data: Mapping[str, Any]) -> str:
    src = data.get("source_model") or {}
    if not src:
        return _na("source model provenance")
    init = src.get("initial_weights") or {}
    init_text = (
        f"{html.escape(str(init.get('weights', 'n/a')))}"
        + (
            f" (sha256 <code>{html.escape(str(init['sha256']))}</code>)"
            if init.get("sha256")
            else ""
        )
        if isinstance(init, Mapping)
        else html.escape(str(init))
    )
    items = [
        ("weights sha256", f"<code>{_e(src.get('weights_sha256'))}</code>"),
        ("origin", _e(src.get("origin"))),
        ("reused from an earlier run", _e(src.get("reused"))),
        ("initial weights", init_text or "n/a"),
        ("source data version", f"<code>{_e(src.get('source_data_version'))}</code> "
         '<span class="muted">(manifest sha256 of the data the source model was trained on; '
         "the summary's source version is this run's input)</span>"),
        ("source test accuracy", _e(src.get("source_test_accuracy"))),
        ("architecture", _e(src.get("arch"))),
        ("pretrain MLflow run", f"<code>{_e(src.get('run_id'))}</code>"),
        ("model dir", f"<code>{_e(src.get('model_dir'))}</code>"),
    ]
    body = _kv(items)
    recorded, actual = src.get("recorded_weights_sha256"), src.get("weights_sha256")
    if recorded and actual and recorded != actual:
        body = (
            '<div class="banner danger"><strong>Provenance mismatch:</strong> the run '
            f"recorded source weights <code>{html.escape(str(recorded))}</code> but the model "
            f"used here hashes to <code>{html.escape(str(actual))}</code>.</div>"
        ) + body
    origin = str(src.get("origin") or "")
    if origin and not origin.startswith("pretrained here"):
        body += (
            '<div class="banner note">The source weights were not trained by this pipeline: '
            "a transferred model inherits its source's flaws (backdoors, spurious features). "
            f"Audit where <code>{html.escape(origin)}</code> came from.</div>"
        )
    return (
        "<p>A transferred model inherits its source model's flaws, so the source must be "
        "traceable.</p>" + body
    )


def _strategy_html(data: Mapping[str, Any]) -> str:
    s = data.get("summary") or {}
    if not s.get("strategy"):
        return _na("fine-tuning strategy")
    items = [
        ("strategy", f"<strong>{_e(s.get('strategy'))}</strong>"),
        ("reason", _e(s.get("strategy_reason"))),
        ("labels per class", _e(s.get("labels_per_class"))),
    ]
    rule = s.get("strategy_rule")
    if rule:
        items.append(("auto rule", html.escape(str(rule))))
    return _kv(items)


def _run_line(data: Mapping[str, Any]) -> str:
    run = data.get("run") or {}
    parts = []
    if run.get("run_id"):
        parts.append(f"MLflow run <code>{html.escape(str(run['run_id']))}</code>")
    for key in ("run_name", "experiment", "status", "start_time"):
        if run.get(key):
            parts.append(f"{key.replace('_', ' ')}: {html.escape(str(run[key]))}")
    if run.get("git_commit"):
        parts.append(f"git <code>{html.escape(str(run['git_commit'])[:12])}</code>")
    return " &middot; ".join(parts)


def render_html(
    data: Mapping[str, Any],
    curve_png: Path | None,
    confusion_pngs: Mapping[str, Path],
    summary_png: Path | None = None,
    calibration_png: Path | None = None,
) -> str:
    title = str(data.get("title") or "Transfer report")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = list(data.get("notes") or [])
    sections = [
        _section("summary", "Summary", _summary_html(data)),
        _section("data-sizes", "Data sizes", _data_html(data)),
        _section("transfer-checks", "Does transfer make sense?", _checks_html(_checks(data))),
        _section("sample-efficiency", "Sample efficiency", _curve_html(data, curve_png)),
        _section("confusion-matrices", "Confusion matrices", _confusion_html(confusion_pngs)),
        _section("calibration", "Calibration", _calibration_html(data, calibration_png)),
        _section("provenance", "Source model provenance", _provenance_html(data)),
        _section("strategy", "Fine-tuning strategy", _strategy_html(data)),
    ]
    if notes:
        sections.append(
            _section(
                "report-notes",
                "Report notes",
                '<ul class="notes">'
                + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
                + "</ul>",
            )
        )
    if summary_png is not None:
        sections.append(
            _section("one-page", "One-page summary", _img(summary_png, "one-page summary"))
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        f'<header><h1>{html.escape(title)}</h1><p class="sub">{_run_line(data)}</p></header>\n'
        + "\n".join(sections)
        + f"\n<footer>Generated {now} by transfer-pipeline (<code>transfer report</code>).</footer>"
        "\n</body></html>\n"
    )


# --------------------------------------------------------------------------- one-page PNG


def _headline(data: Mapping[str, Any]) -> list[str]:
    s, src = data.get("summary") or {}, data.get("source_model") or {}
    gain = _gain(s)
    lines = [
        f"transfer {_f(s.get('transfer_accuracy'))}   scratch {_f(s.get('scratch_accuracy'))}   "
        f"gain {_f(gain, sign=True)}   strategy {_f(s.get('strategy'))}   "
        f"k = {_f(s.get('labels_per_class'))} labels/class",
        f"source weights sha256 {str(src.get('weights_sha256') or 'n/a')[:16]}...   "
        f"origin {_f(src.get('origin'))}   "
        f"source test accuracy {_f(src.get('source_test_accuracy'))}",
    ]
    checks = _checks(data)
    if checks:
        lines.append("checks: " + "   ".join(f"{c['check']} {_level(c).upper()}" for c in checks))
    return lines


# --------------------------------------------------------------------------- entry point


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def plot_report_page(data: Mapping[str, Any], path: str | Path) -> Path:
    """The one-page PNG of the report data (``transfer.plots.plot_report_page``)."""
    run_id = (data.get("run") or {}).get("run_id")
    title = str(data.get("title") or "Transfer report") + (f"  (run {run_id})" if run_id else "")
    return plots.plot_report_page(
        path, title, _headline(data), negative_transfer(data.get("summary") or {}),
        data.get("sample_efficiency") or {}, _run_point(data), data.get("confusion") or {},
    )


def build_report(data: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.html (self-contained), report.png and the plots/JSON behind them.

    Returns ``{"html", "png", "json", "curve"?, "confusion_transfer"?, "confusion_scratch"?}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    se = data.get("sample_efficiency") or {}
    if plots.norm_curves(se.get("curves") or {}):
        paths["curve"] = plots.plot_sample_efficiency(
            se["curves"], out / "sample_efficiency.png", run_point=_run_point(data),
            analysis=se.get("analysis"),
        )
    confusion_pngs: dict[str, Path] = {}
    for name in ("transfer", "scratch"):
        block = (data.get("confusion") or {}).get(name)
        if block and block.get("matrix"):
            confusion_pngs[name] = paths[f"confusion_{name}"] = plots.plot_confusion(
                block, name, out / f"confusion_{name}.png"
            )
    calibration = ((data.get("confusion") or {}).get("transfer") or {}).get("calibration") or {}
    if (calibration.get("reliability") or {}).get("calibrated"):
        paths["calibration"] = plots.plot_calibration(calibration, out / "calibration.png")
    paths["png"] = plot_report_page(data, out / "report.png")
    full = dict(data)
    full.setdefault("checks", _checks(data))
    html_text = render_html(full, paths.get("curve"), confusion_pngs, calibration_png=paths.get("calibration"))
    paths["html"] = out / "report.html"
    paths["html"].write_text(html_text, encoding="utf-8")
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(_jsonable(full), indent=2))
    return paths
