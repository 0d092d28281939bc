"""Sample efficiency over seeds: paired gains, labels saved, significance end, default k from val."""

from __future__ import annotations

import math

import pytest

from transfer.efficiency import (
    best_by_val, gain_stops_significant, gains_over_scratch, labels_saved, recommend_default_k, seed_gain,
)
from transfer.report import efficiency_analysis

# Per-seed test accuracies (5 seeds): transfer helps a lot at k=1, a little at 5, not at 20.
TEST = {
    "scratch": {1: [0.50, 0.52, 0.48, 0.51, 0.49], 5: [0.80, 0.82, 0.79, 0.81, 0.80], 20: [0.95, 0.96, 0.94, 0.95, 0.96]},
    "full": {1: [0.70, 0.71, 0.69, 0.72, 0.70], 5: [0.86, 0.87, 0.85, 0.86, 0.88], 20: [0.95, 0.95, 0.95, 0.96, 0.95]},
    "head": {1: [0.60, 0.62, 0.61, 0.59, 0.60], 5: [0.70, 0.72, 0.71, 0.70, 0.69], 20: [0.80, 0.81, 0.80, 0.79, 0.80]},
}
# Validation disagrees with test on purpose at k=20: choices must follow val.
VAL = {
    "scratch": {1: [0.5] * 5, 5: [0.80] * 5, 20: [0.95] * 5},
    "full": {1: [0.6] * 5, 5: [0.90] * 5, 20: [0.90] * 5},
    "head": {1: [0.7] * 5, 5: [0.70] * 5, 20: [0.97] * 5},
}


def test_seed_gain_is_a_paired_t_test():
    g = seed_gain(TEST["full"][1], TEST["scratch"][1])
    assert g.mean == pytest.approx(0.204) and g.ci_low < g.mean < g.ci_high
    assert g.p_value < 1e-4 and g.better() and g.n_seeds == 5
    flat = seed_gain(TEST["full"][20], TEST["scratch"][20])
    assert not flat.significant() and not flat.better()
    single = seed_gain([0.9], [0.8])
    assert math.isnan(single.p_value) and not single.significant() and "1 seed" in single.describe()
    same = seed_gain([0.9, 0.8], [0.8, 0.7])  # identical differences: no t-test, no claim
    assert math.isnan(same.p_value) and not same.better() and "no spread" in same.describe()
    assert seed_gain([0.8, 0.7], [0.8, 0.7]).p_value == 1.0
    with pytest.raises(ValueError, match="paired by seed"):
        seed_gain([0.9, 0.8], [0.8])


def test_best_by_val_and_the_default_k_use_validation_only():
    assert best_by_val(VAL, 1) == "head" and best_by_val(VAL, 5) == "full"
    rec = recommend_default_k(VAL, [1, 5, 20])
    assert rec["k"] == 1 and rec["strategy"] == "head"  # val gain +0.2 at k=1, +0.1 at 5, +0.02 at 20
    assert "VALIDATION" in rec["reason"] and len(rec["candidates"]) == 3


def test_labels_saved_and_where_the_gain_stops():
    scratch_mean = {1: 0.5, 5: 0.804, 20: 0.952}
    saved = labels_saved(scratch_mean, 0.864, 5)
    assert saved["k_scratch_match"] == 20 and saved["saved_per_class"] == 15
    never = labels_saved(scratch_mean, 0.99, 5)
    assert never["k_scratch_match"] is None and "not reach" in never["text"]
    gains = gains_over_scratch(TEST)["full"]
    stops = gain_stops_significant(gains)
    assert stops["k"] == 20 and "stops being a significant gain over scratch at k=20" in stops["text"]
    assert gain_stops_significant({1: gains[1], 5: gains[5]})["k"] is None


def test_efficiency_analysis_states_labels_saved_significance_and_floors():
    floors = {"logreg": {1: [0.5] * 5, 5: [0.84, 0.85, 0.84, 0.86, 0.85], 20: [0.93] * 5},
              "label_spreading": {1: [0.72, 0.73, 0.70, 0.74, 0.71], 5: [0.92] * 5, 20: [0.97] * 5}}
    a = efficiency_analysis(TEST, VAL, floors, default_k=5)
    assert a["basis"] == "validation" and a["best"] == {1: "head", 5: "full", 20: "head"}
    assert a["labels_saved"]["strategy"] == "full" and a["labels_saved"]["k_scratch_match"] == 20
    assert a["gain_stops_significant"]["k"] == 20  # head at k=20 is worse than scratch
    v1, v5 = a["floor_verdicts"][1], a["floor_verdicts"][5]
    assert not v1["beats_all"] and set(v1["not_beaten"]) == {"label_spreading"}  # head 0.60 < 0.72
    assert not v5["beats_all"] and v5["not_beaten"] == ["label_spreading"]
    assert a["summary"]["full"][1]["ci_low"] < a["summary"]["full"][1]["mean"]
    assert efficiency_analysis(TEST, VAL, floors, default_k=7)["labels_saved"]["text"].startswith("the default k=7")
    no_val = efficiency_analysis(TEST, None, None, default_k=5)
    assert no_val["basis"].startswith("test") and no_val["best"][1] == "full"


def test_the_benchmark_ranks_and_recommends_on_validation_never_on_test():
    import importlib.util
    from pathlib import Path

    import numpy as np

    path = Path(__file__).parents[2] / "benchmarks" / "transfer_gain.py"
    spec = importlib.util.spec_from_file_location("transfer_gain_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)

    def run(val: float, test: float, seed: int) -> dict:
        correct = rng.random(400) < test + 0.01 * seed
        return {"val": val + 0.01 * seed, "test": float(correct.mean()), "test_correct": correct}

    # (val, test) per name and k: "head" looks best on val, "full" is best on test.
    figures = {"scratch": {1: (0.3, 0.3), 5: (0.7, 0.7)}, "head": {1: (0.9, 0.5), 5: (0.75, 0.72)},
               "full": {1: (0.5, 0.8), 5: (0.72, 0.9)}, "logreg": {1: (0.6, 0.6), 5: (0.8, 0.8)},
               "svc_rbf": {1: (0.6, 0.6), 5: (0.8, 0.8)}, "label_spreading": {1: (0.6, 0.6), 5: (0.8, 0.8)}}
    runs = {n: {k: [run(*vt, s) for s in range(3)] for k, vt in row.items()} for n, row in figures.items()}
    a = bench.analyse(runs, [1, 5], ["scratch", "head", "full"])
    assert a["val_ranking"] == {1: ["head", "full"], 5: ["head", "full"]}
    assert a["default"]["k"] == 1 and a["default"]["strategy"] == "head"  # val gain +0.6 at k=1
    assert a["labels_saved"]["k_transfer"] == 1 and a["labels_saved"]["k_scratch_match"] == 5
    assert not a["floors_vs_val_best"][1]["logreg"]["beats"]  # head's test 0.5 < logreg 0.6
    table = bench.markdown(a, [1, 5], ["scratch", "head", "full"], [0, 1, 2],
                           {"source_test_accuracy": 0.99, "n_val": 100, "n_test": 400})
    assert "| 1 | **head** | 1 |" in table and "does NOT beat" in table
    assert "Recommended default finetune.labels_per_class = 1" in table
