"""``edgefleet bench console`` on a small fleet: it builds the registry, serves the real console,
signs in and times the fleet pages; only the JSON's shape is checked here (not the timings)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shared.cli import cli as edgefleet


@pytest.mark.timeout(240)
def test_bench_console_prints_the_timings_as_json() -> None:
    result = CliRunner().invoke(
        edgefleet,
        ["bench", "console", "--devices", "300", "--requests", "3", "--warmup", "1", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["benchmark"] == "console"
    assert out["devices"] == 300
    assert out["edges"] == 3
    assert out["database"] == "sqlite"
    for page in ("fleet_page", "fleet_page_deep", "fleet_filter", "healthz"):
        for kind in ("ttfb_ms", "full_ms"):
            stats = out[f"{page}_{kind}"]
            assert set(stats) == {"p50", "p95", "max"}
            assert 0 < stats["p50"] <= stats["p95"] <= stats["max"]
        assert out[f"{page}_bytes"] > 0
    assert set(out["ttfb_p50_over_healthz"]) == {"fleet_page", "fleet_page_deep", "fleet_filter"}
    assert out["target"] == {"fleet_page_ttfb_ms_p95": 300.0}
    assert isinstance(out["met"], bool)
