"""``edgefleet bench rollout --security all`` on a tiny fleet: the anonymous run and the runs on
``edgefleet broker run`` (edges logging in with their own identities, ACLs, TLS); keys and counts
only, never timings."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shared.cli import cli as edgefleet


@pytest.mark.timeout(600)
def test_bench_rollout_security_all_runs_every_variant() -> None:
    result = CliRunner().invoke(
        edgefleet,
        ["bench", "rollout", "--edges", "2", "--security", "all", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["edges"] == 2
    assert "seconds_to_all_serving" in out  # the anonymous run's figures, as without --security
    security = out["security"]
    for variant in ("none", "auth", "tls"):
        figures = security[variant]
        assert figures["windows_sent"] > 0
        assert figures["windows_lost"] == 0, variant  # the edges got their devices' telemetry
        assert figures["windows_duplicated"] == 0, variant
    for variant in ("auth", "tls"):
        assert security[variant]["acl_site_rules_intact"] is True
        assert security[f"{variant}_vs_none"]["windows_lost_added"] == 0
    assert security["hash_iterations"] == 210_000
