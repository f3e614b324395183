"""``edgefleet demo --dataset``'s plan (``cloud.demo.runtime.plan_replay``) on aeon's shipped data: the
bootstrap's data, each device's labelled test-split shard before and after drift, and the datasets
it cannot replay. No process is started."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cloud.demo import runtime as rt
from cloud.demo.supervisor import Supervisor
from cloud.errors import SupervisorError

pytest.importorskip("aeon", reason="the datasets extra (aeon) is not installed")


def _topology(tmp_path: Path, dataset: str, devices: int) -> rt.Topology:
    options = rt.DemoOptions(devices=devices, data_dir=tmp_path / "demo", dataset=dataset)
    rt.prepare_dirs(options)
    return rt.Topology(
        options=options,
        supervisor=Supervisor(tmp_path / "demo" / "logs"),
        broker_url="mqtt://127.0.0.1:1",
        broker_kind="mosquitto",
        celery_kind="-",
        cloud_env={},
        edge_ids=["edge-1", "edge-2"],
        device_ids=rt.device_ids(devices),
    )


def _rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["X"], data["y"]


def test_a_held_out_class_never_reaches_the_bootstrap_and_joins_the_replay_at_drift(tmp_path: Path) -> None:
    from cloud.learning import datasets  # noqa: PLC0415  (numpy, aeon)

    topo = _topology(tmp_path, "aeon:BasicMotions", devices=4)
    plan = rt.plan_replay(topo)
    full = datasets.load("aeon:BasicMotions")
    held = full.class_names.index(plan.held_out or "")
    assert topo.options.model_name == "basicmotions"
    assert plan.row_length == full.X.shape[1]
    # The bootstrap's data: every row but the held-out class's, the published split kept, every class named.
    base = datasets.load_npz(plan.base_dataset)
    assert held not in set(base.y.tolist())
    assert base.class_names == full.class_names
    assert base.split is not None
    assert len(base.y) == int((full.y != held).sum())
    # Before drift the devices replay exactly the test rows of the other classes, after it every test row:
    # each row in one shard only, with its own label.
    test = np.flatnonzero(np.asarray(full.split) == datasets.TEST)
    before = [_rows(plan.before[d]) for d in topo.device_ids]
    after = [_rows(plan.after[d]) for d in topo.device_ids]
    assert sum(len(y) for _, y in before) == int((full.y[test] != held).sum())
    assert sum(len(y) for _, y in after) == len(test) == plan.test_rows
    assert all(held not in set(y.tolist()) for _, y in before)
    replayed = {(x.tobytes(), int(label)) for x_all, y in after for x, label in zip(x_all, y, strict=True)}
    assert replayed == {(full.X[i].tobytes(), int(full.y[i])) for i in test}


def test_two_classes_stream_without_drift_and_unequal_rows_are_refused(tmp_path: Path) -> None:
    plan = rt.plan_replay(_topology(tmp_path / "gunpoint", "aeon:GunPoint", devices=3))
    assert plan.held_out is None
    assert plan.after == {}
    assert plan.note is not None
    assert "2 classes" in plan.note
    with pytest.raises(SupervisorError, match="unequal length"):
        rt.plan_replay(_topology(tmp_path / "vowels", "aeon:JapaneseVowels", devices=3))
    with pytest.raises(SupervisorError, match="fewer devices"):
        rt.plan_replay(_topology(tmp_path / "many", "aeon:BasicMotions", devices=200))


def test_the_bootstrap_of_a_replayed_dataset_trains_with_the_small_data_recipe(tmp_path: Path) -> None:
    from cloud.learning import training  # noqa: PLC0415  (numpy)

    topo = _topology(tmp_path, "aeon:ArrowHead", devices=4)
    plan = rt.plan_replay(topo)
    config = yaml.safe_load(rt.pipeline_config_file(topo, plan.base_dataset).read_text())
    fitted = training.TrainingConfig.model_validate(config["training"])
    assert fitted.architecture == "resnet"
    assert fitted.augment
    assert fitted.max_seconds == rt.DATASET_TRAINING_MAX_S
    assert config["dataset"] == str(plan.base_dataset.resolve())
