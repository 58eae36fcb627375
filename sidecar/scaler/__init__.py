"""`work-sidecar scaler`: a KEDA external scaler (`externalscaler.ExternalScaler`) on the Work API queue.

It only reads `GET …/work/stats` (never polls or acks), once per `--stats-interval` per environment,
whatever the number of KEDA calls and ScaledObjects; see `_readings.py`, `_service.py` and docs/scaler.md.
"""

from ._cli import SCALER_FLAGS, main, scaler_config
from ._config import ScalerConfig
from ._metadata import ACTIVATION, ENVIRONMENT_ID, TARGET
from ._server import SERVICE_NAME, Scaler
from ._service import METRIC_NAME

__all__ = [
    "ACTIVATION",
    "ENVIRONMENT_ID",
    "METRIC_NAME",
    "SCALER_FLAGS",
    "SERVICE_NAME",
    "TARGET",
    "Scaler",
    "ScalerConfig",
    "main",
    "scaler_config",
]
