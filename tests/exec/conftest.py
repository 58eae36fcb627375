from tests.core.conftest import api, provider, short_dir, start_sidecar  # noqa: F401 - shared fixtures
