"""Pure logic of the edge node, and the runtime on real .tflite models (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.cache import ResultCache, window_key
from edge_node.errors import BackendError
from edge_node.ingest import Deduplicator
from edge_node.models import derive_manifest
from edge_node.rules import RuleEngine, RuleSpec, load_rules
from edge_node.runtime import (
    SHRINK_AFTER_BATCHES,
    Backend,
    ModelRunner,
    load_backend,
    to_probabilities,
)
from edge_node.synthetic import synthetic_dataset
from edge_node.uplink import HardExampleMiner, UplinkQueue
from shared.errors import ConfigError
from shared.schemas import Normalization
from shared.settings import EdgeSettings, load_settings
from shared.settings.edge import UplinkSettings
from tests.support.edge_fixtures import CLASS_NAMES, edge_models_fixture  # noqa: F401  (fixture)

# -- backends ---------------------------------------------------------------------------------


def _fake_importer(available: set[str], tried: list[str]):  # type: ignore[no-untyped-def]
    def importer(name: str) -> Backend:
        tried.append(name)
        if name not in available:
            raise ImportError(f"No module named {name!r}")
        return Backend(name, object, lambda *a: None, None)

    return importer


def test_backend_fallback_order() -> None:
    tried: list[str] = []
    assert load_backend("auto", _fake_importer({"tensorflow"}, tried)).name == "tensorflow"
    assert tried == ["ai-edge-litert", "tflite-runtime", "tensorflow"]
    tried.clear()
    assert (
        load_backend("auto", _fake_importer({"tflite-runtime", "tensorflow"}, tried)).name == "tflite-runtime"
    )
    assert tried == ["ai-edge-litert", "tflite-runtime"]
    tried.clear()
    assert (
        load_backend("auto", _fake_importer({"ai-edge-litert", "tensorflow"}, tried)).name == "ai-edge-litert"
    )
    with pytest.raises(BackendError, match="no LiteRT backend"):
        load_backend("auto", _fake_importer(set(), []))
    with pytest.raises(BackendError, match="tflite-runtime"):
        load_backend("tflite-runtime", _fake_importer({"ai-edge-litert"}, []))


def test_the_default_backend_is_ai_edge_litert_here() -> None:
    assert load_backend("auto").name == "ai-edge-litert"


# -- runtime on real models -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_batched_results_equal_one_by_one(kind: str, edge_models: dict[str, Path], tmp_path: Path) -> None:
    settings = EdgeSettings(edge_id="e1", data_dir=tmp_path, model={"class_names": CLASS_NAMES})
    backend = load_backend("auto")
    path = edge_models[kind]
    content = path.read_bytes()
    manifest = derive_manifest(content, path, backend, settings)
    assert manifest.input_dtype == kind
    runner = ModelRunner(backend.make_interpreter(content, settings.runtime), manifest, max_batch=64)
    x, y = synthetic_dataset(37, seed=11)
    batched = runner.predict(x)
    single = np.concatenate([runner.predict(x[i : i + 1]) for i in range(len(x))])
    assert batched.shape == (37, 4)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, atol=0.05)
    assert (batched.argmax(axis=1) == y).mean() > 0.5  # a trained model, not noise


def test_light_uneven_load_does_not_resize_the_interpreter_back_and_forth(
    edge_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = EdgeSettings(edge_id="e1", data_dir=tmp_path, model={"class_names": CLASS_NAMES})
    backend = load_backend("auto")
    path = edge_models["int8"]
    content = path.read_bytes()
    manifest = derive_manifest(content, path, backend, settings)
    runner = ModelRunner(backend.make_interpreter(content, settings.runtime), manifest, max_batch=64)
    x, _ = synthetic_dataset(8, seed=3)
    expected = np.concatenate([runner.predict(x[i : i + 1]) for i in range(8)])
    runner.predict(x[:4])  # grows at once
    grown = runner.resizes
    for i in range(SHRINK_AFTER_BATCHES - 1):  # 1- and 2-row batches run padded to 4: no resize
        rows = x[i % 8 : i % 8 + 1 + i % 2]
        np.testing.assert_allclose(runner.predict(rows), expected[i % 8 : i % 8 + len(rows)], atol=1e-5)
    assert runner.resizes == grown
    runner.predict(x[:1])  # a smaller size has fitted long enough: shrinks once
    assert runner.resizes == grown + 1


def test_int8_and_float32_models_agree(edge_models: dict[str, Path], tmp_path: Path) -> None:
    settings = EdgeSettings(edge_id="e1", data_dir=tmp_path, model={"class_names": CLASS_NAMES})
    backend = load_backend("auto")
    out = {}
    x, _ = synthetic_dataset(64, seed=5)
    for kind in ("float32", "int8"):
        content = edge_models[kind].read_bytes()
        manifest = derive_manifest(content, edge_models[kind], backend, settings)
        out[kind] = ModelRunner(backend.make_interpreter(content, settings.runtime), manifest, 64).predict(x)
    agreement = (out["float32"].argmax(1) == out["int8"].argmax(1)).mean()
    assert agreement > 0.9


def test_logits_go_through_softmax() -> None:
    probs = to_probabilities(np.array([[2.0, 1.0, -1.0]], dtype=np.float32))
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-6)
    passthrough = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(to_probabilities(passthrough), passthrough)


# -- dedup, cache ------------------------------------------------------------------------------


def test_dedup_window_and_device_lru() -> None:
    dedup = Deduplicator(window=4, max_devices=2)
    assert dedup.check("a", 10) is None
    assert dedup.check("a", 10) == "duplicate"
    assert dedup.check("a", 8) is None  # late but inside the window
    assert dedup.check("a", 8) == "duplicate"
    for seq in (11, 12, 13, 14):
        assert dedup.check("a", seq) is None
    assert dedup.check("a", 10) == "stale"  # fell out of the window: cannot tell, dropped and counted
    assert dedup.check("b", 1) is None
    assert dedup.check("c", 1) is None  # evicts "a"
    assert dedup.check("a", 10) is None
    assert dedup.check("a", 5_000_000) is None
    assert dedup.check("a", 3) is None  # far below the newest: the device counts from 0 again
    assert dedup.resets == 1
    assert dedup.check("a", 3) == "duplicate"


def test_cache_is_keyed_by_window_and_version() -> None:
    cache = ResultCache(2)
    w = np.ones((100, 3), dtype=np.float32)
    k1, k2 = window_key(w, "v1"), window_key(w, "v2")
    assert k1 != k2
    cache.put(k1, np.array([1.0]))
    assert cache.get(k1) is not None
    assert cache.get(k2) is None
    assert cache.hit_rate == 0.5
    cache.clear()
    assert cache.get(k1) is None


# -- rules ---------------------------------------------------------------------------------------


def _rule(**kw: object) -> RuleSpec:
    return RuleSpec.model_validate({"name": "r", "class": "bearing_fault", **kw})


def test_k_of_n_cooldown_and_rate_limit() -> None:
    engine = RuleEngine([_rule(min_probability=0.9, k=3, n=5, cooldown_s=10)], CLASS_NAMES)
    hot, cold = [0.0, 0.0, 0.0, 0.95], [0.9, 0.05, 0.05, 0.0]
    pattern = [hot, cold, hot, cold, hot]
    fired = [bool(engine.evaluate("d1", p, i, 0.0, now=float(i))) for i, p in enumerate(pattern)]
    assert fired == [False, False, False, False, True]
    assert not engine.evaluate("d1", hot, 5, 0.0, now=5.0)  # cooldown
    assert engine.suppressed_cooldown == 1
    assert engine.evaluate("d1", hot, 6, 0.0, now=15.0)  # cooldown over, still 3 of the last 5
    assert not engine.evaluate("d2", hot, 0, 0.0, now=15.0)  # per device

    limited = RuleEngine([_rule(min_probability=0.5, max_per_minute=2)], CLASS_NAMES)
    results = [bool(limited.evaluate(f"d{i}", hot, 0, 0.0, now=1.0)) for i in range(4)]
    assert results == [True, True, False, False]
    assert limited.suppressed_rate == 2
    assert limited.evaluate("d9", hot, 0, 0.0, now=62.0)


def test_rules_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: x\n    class: a\n    k: 5\n    n: 3\n")
    with pytest.raises(ConfigError, match="k \\(5\\) must not exceed n"):
        load_rules(path)
    path.write_text("rules:\n  - name: x\n    class: a\n    command: {name: explode}\n")
    with pytest.raises(ConfigError, match=r"command\.name"):
        load_rules(path)
    example = Path(__file__).resolve().parents[2] / "examples" / "rules.yaml"
    assert load_rules(example)


def test_examples_edge_yaml_loads() -> None:
    settings = load_settings(EdgeSettings, Path(__file__).resolve().parents[2] / "examples" / "edge.yaml")
    assert settings.edge_id


# -- uplink ----------------------------------------------------------------------------------------


def test_uplink_queue_is_durable_and_counts_overflow(tmp_path: Path) -> None:
    store = UplinkQueue(tmp_path / "u.sqlite", max_rows=3)
    for i in range(5):
        store.put(f"m{i}".encode())
    assert store.depth == 3
    assert store.dropped == 2
    store.close()
    reopened = UplinkQueue(tmp_path / "u.sqlite", max_rows=3)
    rows = reopened.after(0, 10)
    assert [p for _, p in rows] == [b"m2", b"m3", b"m4"]
    reopened.delete([rows[0][0]])
    assert reopened.depth == 2
    reopened.close()


def test_miner_picks_hard_windows_within_budget() -> None:
    miner = HardExampleMiner(
        "e1", UplinkSettings(low_confidence=0.6, min_margin=0.2, random_fraction=0.0, budget_per_minute=2)
    )
    probs = np.array(
        [[0.5, 0.3, 0.1, 0.1], [0.55, 0.45, 0.0, 0.0], [0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1]],
        dtype=np.float32,
    )
    picked = miner.select(probs)
    assert [(i, r.value) for i, r in picked] == [(0, "low_confidence"), (1, "low_confidence")]
    assert miner.over_budget == 1
    margin = HardExampleMiner("e1", UplinkSettings(low_confidence=0.5, min_margin=0.2, random_fraction=0.0))
    assert [r.value for _, r in margin.select(probs[1:2])] == ["small_margin"]


def test_manifest_normalization_is_applied_before_quantization(
    edge_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = EdgeSettings(edge_id="e1", data_dir=tmp_path, model={"class_names": CLASS_NAMES})
    backend = load_backend("auto")
    content = edge_models["int8"].read_bytes()
    plain = derive_manifest(content, edge_models["int8"], backend, settings)
    norm = Normalization(mean=[0.5, -0.25, 1.0], std=[2.0, 0.5, 4.0])
    normalized = plain.model_copy(update={"normalization": norm})
    x, _ = synthetic_dataset(16, seed=3)
    with_norm = ModelRunner(backend.make_interpreter(content, settings.runtime), normalized, 64).predict(x)
    by_hand = ModelRunner(backend.make_interpreter(content, settings.runtime), plain, 64).predict(
        (x - np.array(norm.mean, dtype=np.float32)) / np.array(norm.std, dtype=np.float32)
    )
    np.testing.assert_allclose(with_norm, by_hand, atol=1e-6)
