"""Issue 12, item 2's proof: a real dataset's test split, replayed by real device agents through a real
edge node, is classified by the served int8 model exactly as offline LiteRT evaluation says.

GunPoint (aeon's shipped copy, its published 50 / 150 train / test split, univariate, rows of 150
samples) and BasicMotions (40 / 40, 6 channels, rows of 100 samples): the pipeline's steps train a
small network for a short budget and build the int8 variant;
its offline test accuracy comes from LiteRT on the prepared test split. That artifact is served with
a signed manifest carrying the normalisation and preprocessing, deployed to an ``EdgeNode`` by a
signed desired-state order over a private mosquitto. Three ``Agent`` s each replay a shard of the
test rows (``replay`` sensor, ``loop: false``, window = row length: each window is one row, with that
row's label) at a high sample rate. Every test row must be classified exactly once, by that model,
with its own label, and the edge's own labelled accuracy must be within 0.5 points of the offline
int8 accuracy."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from shared.private_broker import mosquitto_binary
from shared.schemas import ModelManifest, Normalization, Preprocessing, Quantization, encode_message
from shared.settings import AgentSettings
from shared.signing import load_private_key, sign_manifest
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    Keys,
    Wire,
    edge_settings,
    running_node,
    signed_desired,
    signing_keys_fixture,  # noqa: F401  (fixture)
    wait_for,
)

pytest.importorskip("aeon", reason="the datasets extra (aeon) is not installed")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

DEVICES = 3
WINDOWS_PER_S = 20  # per device: the rate is this many rows a second
TOLERANCE = 0.005  # 0.5 points
TOPICS = Topics()


class Decided:
    """The edge's observer: every window it classified, with the model version that did it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.windows: list[tuple[str, int, str | None, str]] = []

    def __call__(self, items: list[Any], version: str) -> None:
        with self.lock:
            self.windows.extend(
                (it.window.device_id, it.window.seq, it.window.label, version) for it in items
            )

    def count(self) -> int:
        with self.lock:
            return len(self.windows)


def _train_int8(workdir: Path, spec: str) -> tuple[Any, bytes, float]:
    """The prepared dataset, the int8 flatbuffer of a short training run, and its offline test accuracy."""
    from cloud.learning import datasets, pipeline  # noqa: PLC0415  (TensorFlow: only this test)
    from cloud.learning.training import CompressionConfig, TrainingConfig  # noqa: PLC0415

    dataset = datasets.load(spec)
    prepared = pipeline.prepare(dataset, seed=0)
    training = TrainingConfig(
        filters=[16, 32, 32], dense_units=0, epochs=60, batch_size=16, max_seconds=45.0, seed=0
    )
    base = pipeline.train_base(prepared, training)
    result = pipeline.build_variant("int8", base, prepared, training, CompressionConfig(variants=["int8"]))
    (workdir / "int8.tflite").write_bytes(result.flatbuffer)
    return prepared, result.flatbuffer, result.evaluation.accuracy


def _manifest(prepared: Any, artifact: Path, keys: Keys) -> ModelManifest:
    """The signed manifest of the int8 artifact, as the pipeline's ``sign`` step builds it."""
    import hashlib  # noqa: PLC0415

    from cloud.learning.evaluation import LiteRTModel  # noqa: PLC0415  (LiteRT: only this test)

    content = artifact.read_bytes()
    runtime = LiteRTModel(content, num_threads=1)
    preprocessing = getattr(prepared, "preprocessing", None) or Preprocessing(normalize="fitted")
    manifest = ModelManifest(
        name="replayed",
        version="r1-int8",
        quantization=Quantization.INT8,
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        url=artifact.resolve().as_uri(),
        input_shape=runtime.input_shape,
        input_dtype=runtime.input_dtype,
        output_shape=runtime.output_shape,
        output_dtype=runtime.output_dtype,
        class_names=list(prepared.dataset.class_names),
        normalization=Normalization(mean=prepared.mean, std=prepared.std)
        if preprocessing.normalize == "fitted"
        else None,
        preprocessing=preprocessing,
        sample_rate_hz=prepared.dataset.sample_rate_hz,
        channels=prepared.dataset.channels,
    )
    return sign_manifest(manifest, load_private_key(keys.private), key_id=keys.key_id)


def _shards(prepared: Any, workdir: Path) -> list[tuple[Path, np.ndarray]]:
    """The raw test rows in ``DEVICES`` contiguous shards, each an .npz the replay sensor plays."""
    x, y = prepared.splits.x_test, prepared.splits.y_test
    shards = []
    for index, rows in enumerate(np.array_split(np.arange(len(y)), DEVICES)):
        path = workdir / f"shard-{index}.npz"
        extras = {"channels": np.array(prepared.dataset.channels)} if prepared.dataset.channels else {}
        np.savez(path, X=x[rows], y=y[rows], class_names=np.array(prepared.dataset.class_names), **extras)
        shards.append((path, y[rows]))
    return shards


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "spec",
    [
        "aeon:GunPoint",  # 50 / 150 rows, univariate, length 150
        "aeon:BasicMotions",  # 40 / 40 rows, 6 channels, length 100
    ],
)
def test_replayed_test_split_matches_offline_int8_accuracy(
    spec: str, mosquitto: Mosquitto, signing_keys: Keys, tmp_path: Path
) -> None:
    prepared, _, offline_accuracy = _train_int8(tmp_path, spec)
    split = getattr(prepared.dataset, "split", None)
    if split is not None:  # the published test split, nothing else
        assert len(prepared.splits.y_test) == int((np.asarray(split) == 1).sum())
    manifest = _manifest(prepared, tmp_path / "int8.tflite", signing_keys)
    row_length = int(prepared.splits.x_test.shape[1])
    assert manifest.input_shape[0] == row_length
    shards = _shards(prepared, tmp_path)
    class_names = list(prepared.dataset.class_names)

    settings = edge_settings(
        mosquitto.url,
        tmp_path / "edge",
        None,
        cloud_url=mosquitto.url,
        public_key=signing_keys.public,
    )
    decided = Decided()
    ops = Wire(mosquitto.url, "ops")
    agents: list[Agent] = []
    try:
        with running_node(settings, observer=decided) as node:
            order = signed_desired("edge-1", 1, manifest, keys=signing_keys)
            ops.publish(TOPICS.edge("edge-1", EdgeTopic.DESIRED), encode_message(order), retain=True)
            wait_for(
                lambda: node.holder.current is not None and node.holder.current.version == manifest.version,
                "the int8 model swapped in",
                timeout=120,
            )
            for index, (path, _) in enumerate(shards):
                agent = Agent(
                    AgentSettings(
                        device_id=f"replay-{index}",
                        broker={"url": mosquitto.url, "reconnect_min_s": 0.5, "reconnect_max_s": 1.0},
                        sensor={"kind": "replay", "options": {"path": str(path), "loop": False}},
                        rate_hz=float(row_length * WINDOWS_PER_S),
                        window=row_length,
                        data_dir=tmp_path / "agents",
                        heartbeat_interval_s=1.0,
                    )
                )
                agent.start()
                agents.append(agent)
            total = sum(len(labels) for _, labels in shards)
            wait_for(lambda: decided.count() >= total, f"{total} test rows classified", timeout=120)
            while agents:
                agents.pop().shutdown()
            labelled, correct = node.stats.labelled_windows, node.stats.labelled_correct
            windows = list(decided.windows)
    finally:
        while agents:
            agents.pop().shutdown()
        ops.close()

    # Every test row exactly once, by the served model, as one window carrying its own row's label.
    counts = Counter((device, seq) for device, seq, _, _ in windows)
    expected = {(f"replay-{i}", seq) for i, (_, labels) in enumerate(shards) for seq in range(len(labels))}
    assert set(counts) == expected, sorted(set(counts) ^ expected)[:10]
    assert max(counts.values()) == 1
    assert {version for *_, version in windows} == {manifest.version}
    for device, seq, label, _ in windows:
        row_labels = shards[int(device.rsplit("-", 1)[1])][1]
        assert label == class_names[int(row_labels[seq])], (device, seq, label)
    # The edge's accuracy on them is the offline int8 test accuracy.
    assert labelled == total
    edge_accuracy = correct / labelled
    print(f"{spec}: int8 accuracy offline {offline_accuracy:.4f}, edge {edge_accuracy:.4f} ({labelled} rows)")
    assert abs(edge_accuracy - offline_accuracy) <= TOLERANCE, (edge_accuracy, offline_accuracy)
