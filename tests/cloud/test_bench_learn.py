"""``edgefleet bench learn --dataset tiny.npz --json`` end to end: its own redis-server, a real Celery
worker, a SQLite registry, the search, the final fit, int8 on the test split, one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cloud.worker.test_selection_tasks import tiny_split_dataset

BENCH_TIMEOUT_S = 240


def test_bench_learn_on_a_tiny_dataset_prints_the_json(tmp_path: Path) -> None:
    data = tiny_split_dataset(tmp_path / "tiny.npz")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "EDGEFLEET_TF_THREADS": "1"}
    env.pop("EDGEFLEET_CLOUD_CONFIG", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "bench",
            "learn",
            "--dataset",
            str(data),
            "--json",
            "--budget-s",
            "40",
            "--epochs",
            "2",
            "--folds",
            "2",
        ],
        env=env,
        capture_output=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-4000:]
    result = json.loads(out.stdout)
    assert result["benchmark"] == "learn"
    assert result["workers"] == 1
    assert result["registry"] == "sqlite"
    assert result["cpu_count"] == os.cpu_count()
    assert len(result["load_avg_before"]) == len(result["load_avg_after"]) == 3
    assert result["suite_seconds"] > 0
    assert result["targets_met"]["int8_le_512kb"] is True
    assert result["targets_met"]["int8_within_2pt_of_resnet"] is None  # nothing published for it
    (one,) = result["datasets"]
    assert one["dataset"] == "tiny"
    assert (one["n_train"] + one["n_val"], one["n_test"]) == (24, 20)  # the published split
    assert one["search"]["folds"] == 2
    assert sum(one["search"]["trials"].values()) == 2 * len(one["search"]["candidates"])
    assert one["search"]["trials"].get("done", 0) >= 1
    assert one["search"]["workers"]
    assert all(w.startswith("learn-0@") for w in one["search"]["workers"])
    assert one["chosen"]["cv_accuracy"] is not None
    assert not one["chosen"]["fallback"]
    for part in ("float32", "int8"):
        assert 0.0 <= one[part]["accuracy"] <= 1.0
        assert one[part]["size_bytes"] > 0
    assert one["int8"]["size_kb"] == round(one["int8"]["size_bytes"] / 1024, 1)
    latency = one["int8"]["latency_ms_b1"]
    assert 0 < latency["p50"] <= latency["p99"]
    assert one["final_fit"]["epochs_run"] >= 1
    assert one["train_seconds"]["search"] > 0
    assert one["train_seconds"]["final"] > 0
    assert one["published"] is None
    assert one["gap_points"]["int8_vs_resnet"] is None
