"""``edgefleet model train --select`` end to end: the CLI (a subprocess) runs a model-selection search
whose trials are ``cv_trial`` tasks on a real Celery worker (subprocess) over a real Redis, prints the
candidates' CV scores, then runs the pipeline in-process with the chosen candidate as its ``training``
section and the search's id recorded in the run's config. Candidates are the tiny ones of
test_selection_tasks (``selection.candidates_for`` replaced in the CLI process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloud.registry import crud
from cloud.registry import selection as registry
from cloud.registry.db import session_scope
from shared.cli import cli
from tests.cloud.worker.test_selection_tasks import tiny_split_dataset
from tests.support.brokers import Mosquitto, RedisServer
from tests.support.celery_worker import celery_worker

REPO = Path(__file__).resolve().parents[3]
CLI_TIMEOUT_S = 180
# The CLI with the tiny candidates: two small CNNs instead of the ResNet / FCN recipe.
TINY_CLI = """
import sys
from cloud.learning import selection
from tests.cloud.worker.test_selection_tasks import tiny_candidates
selection.candidates_for = lambda *args, **kwargs: tiny_candidates()
from shared.cli import cli
cli.main(args=sys.argv[1:], prog_name="edgefleet")
"""


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer, mosquitto: Mosquitto) -> dict[str, str]:
    env = {
        **os.environ,
        "EDGEFLEET_BROKER__URL": mosquitto.url,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "EDGEFLEET_REDIS_URL": redis_server.url,
        "EDGEFLEET_DEV_MODE": "true",
        "EDGEFLEET_TF_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(REPO),
    }
    env.pop("EDGEFLEET_CLOUD_CONFIG", None)
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "cloud", "db", "upgrade"],
        env=env,
        check=True,
        capture_output=True,
    )
    return env


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with celery_worker(env, tmp_path / "worker.log", name="select") as proc:
        yield proc


def test_train_select_searches_on_the_workers_then_trains_the_chosen_candidate(
    env: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    data = tiny_split_dataset(tmp_path / "tiny.npz")
    argv = ["model", "train", "--dataset", str(data), "--name", "tiny", "--variant", "int8"]
    argv += ["--select", "--folds", "2", "--select-budget-s", "120", "--epochs", "2"]
    out = subprocess.run(
        [sys.executable, "-c", TINY_CLI, *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    stdout = out.stdout.decode(errors="replace")
    print(stdout)  # shown by pytest -rP or on failure
    if out.returncode != 0:
        log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"exit {out.returncode}\n{stdout}\n{out.stderr.decode()[-3000:]}\n--- worker ---\n{log}")
    assert "narrow" in stdout
    assert "wide" in stdout
    assert "chosen" in stdout
    assert "CV accuracy" in stdout

    with session_scope(env["EDGEFLEET_DATABASE_URL"]) as session:
        (run,) = crud.list_runs(session, limit=10)
        search_id = run.config["selection_search_id"]
        assert isinstance(search_id, int)
        search = registry.get_search(session, search_id=search_id)
        assert (search.state, search.folds) == ("done", 2)
        chosen = search.candidates[search.best_candidate]
        assert run.config["training"] == chosen["config"]  # the chosen candidate, epochs capped
        assert run.config["training"]["epochs"] == 2
        trials = registry.list_trials(session, search_id=search_id)
        assert len(trials) == 4
        assert all(t.status == "done" and t.epochs_run == 2 for t in trials)
        assert all(t.worker and t.worker.startswith("select-") for t in trials)  # run by the Celery worker
        assert run.state in ("published", "rejected")
        assert f"search {search_id}: chose {chosen['name']}" in stdout
    shown = subprocess.run(
        [sys.executable, "-m", "shared.cli", "model", "show", "tiny@production"],
        env=env, cwd=REPO, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    assert json.loads(shown.stdout)["run"]["selection_search_id"] == search_id
    assert worker.poll() is None


def test_select_options_need_select_and_a_dataset(tmp_path: Path) -> None:
    runner = CliRunner()
    alone = runner.invoke(cli, ["model", "train", "--folds", "2"])
    assert alone.exit_code == 2
    assert "--select-budget-s and --folds go with --select" in alone.output
    env = {"EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}", "EDGEFLEET_DATA_DIR": str(tmp_path)}
    samples = runner.invoke(cli, ["model", "train", "--dataset", "samples", "--select"], env=env)
    assert samples.exit_code != 0
    assert "--select needs a dataset" in samples.output
