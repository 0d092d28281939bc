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
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# summaries and sense checks live in transfer.checks (shared with validation); re-exported
from transfer.checks import dataset_summary, transfer_sense_checks  # noqa: F401
from transfer import plots, templating
from transfer.plots import plot_sample_efficiency  # noqa: F401  (re-exported: the report's API)
from transfer.stats import format_p
# the sweep lives in transfer.sweep (the `sweep` stage); re-exported: the report's API
from transfer.sweep import (  # noqa: F401
    DEFAULT_KS, DEFAULT_SEEDS, DEFAULT_STRATEGIES, SCRATCH, Curves, sample_efficiency,
)


# --------------------------------------------------------------------------- sample efficiency


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


def _level(check: Mapping[str, Any]) -> str:
    return str(check.get("level") or ("pass" if check.get("passed") else "fail"))


def _size_text(summary: Mapping[str, Any]) -> str:
    w, h = summary.get("width"), summary.get("height")
    if not w or not h:
        return "n/a"
    text = f"{w['median']:g}x{h['median']:g}"
    if (w["min"], h["min"]) != (w["max"], h["max"]):
        text += f" ({w['min']}x{h['min']} .. {w['max']}x{h['max']})"
    return text


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


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _curve_ks(curves: Mapping[str, Sequence[tuple[int, float]]]) -> list[int]:
    return sorted({k for pts in curves.values() for k, _ in pts})


def _curve_rows(curves: Mapping[str, Sequence[tuple[int, float]]], summary: Mapping[str, Any],
                floors: Mapping[str, Any]) -> list[tuple[str, dict[int, float], dict[int, Any]]]:
    """(name, {k: mean}, {k: 95% interval row}) per line of the table: scratch, strategies, floors."""
    def spread(rows: Mapping[Any, Any] | None) -> dict[int, Any]:
        return {int(k): v for k, v in (rows or {}).items()}

    rows = [(name, dict(pts), spread(summary.get(name)))
            for name, pts in sorted(curves.items(), key=lambda kv: kv[0] != SCRATCH)]
    rows += [(f"floor: {name}", {int(k): float(v["mean"]) for k, v in frow.items()}, spread(frow))
             for name, frow in floors.items()]
    return rows


def _floor_verdicts(analysis: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    verdicts = (analysis.get("floor_verdicts") or {}).items()
    return [(int(k), v) for k, v in sorted(verdicts, key=lambda kv: int(kv[0])) if v.get("vs")]


def _plain_ci(interval: Sequence[float] | None, sign: bool = False) -> str:
    """`` [0.941, 0.969]``: a 95% interval after a figure (empty for runs that logged none)."""
    if not interval:
        return ""
    fmt = "{:+.3f}" if sign else "{:.3f}"
    return f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def _helpers() -> dict[str, Any]:
    """What the report template calls (formatting and the report's own reading of the data)."""
    from jinja2 import Undefined

    def f(value: Any, digits: int = 3, sign: bool = False) -> str:  # a missing key reads "n/a"
        return _f(None if isinstance(value, Undefined) else value, digits, sign)

    return dict(
        f=f, ci=_plain_ci, p=format_p, gain_of=_gain, negative_transfer=negative_transfer,
        version_state=version_state, size_text=_size_text, data_uri=png_data_uri,
        norm_curves=plots.norm_curves, curve_ks=_curve_ks, curve_rows=_curve_rows,
        floor_verdicts=_floor_verdicts, negative_points=negative_points,
    )


def render_html(
    data: Mapping[str, Any],
    curve_png: Path | None,
    confusion_pngs: Mapping[str, Path],
    summary_png: Path | None = None,
    calibration_png: Path | None = None,
) -> str:
    """The self-contained report page (``transfer/templates/report.html.j2``)."""
    checks = _checks(data)
    return templating.render(
        "report.html.j2", **_helpers(),
        data=data,
        title=str(data.get("title") or "Transfer report"),
        now=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        checks=None if checks is None else [{**c, "level_": _level(c)} for c in checks],
        curve_png=curve_png, confusion_pngs=confusion_pngs, summary_png=summary_png,
        calibration_png=calibration_png,
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
