"""Fixtures of the security tests: ``secure_broker`` (tests/support/secure_broker.py)."""

from tests.support.secure_broker import secure_broker  # noqa: F401  (a fixture)
