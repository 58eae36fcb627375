"""Fixtures for every test package: a real emulator on loopback (`api`) and real sidecars (`start_sidecar`),
defined with the core tests in `tests/core/conftest.py`."""

from tests.core.conftest import api, provider, short_dir, start_sidecar  # noqa: F401 - shared fixtures
