"""The test PKI in ``shared.pki`` (``edgefleet broker make-certs``, the benchmarks' TLS variants)."""

from __future__ import annotations

import stat
from pathlib import Path

from shared import pki


def test_make_pki_writes_a_ca_server_and_client_certificates(tmp_path: Path) -> None:
    paths = pki.make_pki(tmp_path, clients=("dev-1",))
    for name in ("ca", "server", "server_expired", "client-dev-1", "client-expired"):
        assert paths[name].exists(), name
        assert stat.S_IMODE(paths[f"{name}_key"].stat().st_mode) == 0o600
    assert pki.certificate_problem(paths["server"]) is None
    problem = pki.certificate_problem(paths["server_expired"])
    assert problem is not None
    assert "expired" in problem
