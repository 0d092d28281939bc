"""Params: per-kind defaults, paths checked against their kind, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfer.config import ConfigError, load_params, params_from_dict
from transfer.data.prepare import _target_sizes
from transfer.data.splits import split_counts
from transfer.errors import DataError


def test_target_test_size_defaults_per_kind(tmp_path: Path) -> None:
    assert params_from_dict({}).data.target.resolved_test_size() == 797  # the digits split
    folder = params_from_dict({"data": {"target": {"kind": "imagefolder", "path": str(tmp_path)}}})
    assert folder.data.target.resolved_test_size() == 0.2
    explicit = params_from_dict({"data": {"target": {"test_size": 300}}})
    assert explicit.data.target.resolved_test_size() == 300


def test_count_test_size_larger_than_the_data_names_the_setting() -> None:
    with pytest.raises(DataError, match=r"data.target.test_size=797 .* 120 labelled images.*fraction"):
        _target_sizes(797, 0.1, 120)  # was: val = -68 images


def test_val_and_test_get_the_validation_minimum_per_class() -> None:
    sizes = {"a": 30, "b": 30, "c": 30, "d": 30}
    # 8% of 120 images in val: 2 or 3 a class, under validate.min_per_class=5 ...
    assert {v for _, v, _ in split_counts(sizes, 0.2, 0.08).values()} == {2, 3}
    # ... unless the split guarantees it
    assert set(split_counts(sizes, 0.2, 0.08, min_per_split=5).values()) == {(19, 5, 6)}
    # a class too small for the minimum keeps one training image (validation then names it)
    assert split_counts({"a": 30, "b": 6}, 0.2, 0.1, min_per_split=5)["b"] == (2, 2, 2)


def test_model_name_follows_the_target_data(tmp_path: Path) -> None:
    assert params_from_dict({}).model_name() == "digits-transfer"
    folder = tmp_path / "My Shapes"
    folder.mkdir()
    own = {"data": {"target": {"kind": "imagefolder", "path": str(folder)}}}
    assert params_from_dict(own).model_name() == "My-Shapes-transfer"
    assert params_from_dict({**own, "promote": {"model_name": "mine"}}).model_name() == "mine"


def test_path_must_match_kind_and_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.target.path='/x' is set but data.target.kind=sklearn_digits takes no path"):
        load_params(None, ["data.target.path=/x"])
    with pytest.raises(ConfigError, match="data.source.kind=fonts takes no path"):
        load_params(None, [f"data.source.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^invalid params: data.target.path='/nope': no such directory"):
        load_params(None, ["data.target.kind=imagefolder", "data.target.path=/nope"])
    with pytest.raises(ConfigError, match="data.target.path is required"):
        load_params(None, ["data.target.kind=imagefolder"])


def test_yaml_error_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  lr: 0.1\n   epochs: 3\n")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value) == f"{path}:3:10: invalid YAML: mapping values are not allowed here"
