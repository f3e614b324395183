"""A small test / development PKI for the broker's TLS listeners (``edgefleet broker make-certs``).

It lives in ``shared.pki`` (``cryptography`` imported lazily there), so that the edge's benchmark can
make the same certificates without the cloud package; this module is the broker's name for it.
"""

from __future__ import annotations

from shared.pki import (
    DEFAULT_DAYS,
    EXPIRED_CLIENT,
    Issued,
    certificate_problem,
    issue,
    make_ca,
    make_pki,
    write_issued,
)

__all__ = [
    "DEFAULT_DAYS",
    "EXPIRED_CLIENT",
    "Issued",
    "certificate_problem",
    "issue",
    "make_ca",
    "make_pki",
    "write_issued",
]
