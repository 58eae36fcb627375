"""KEDA's `externalscaler.ExternalScaler`, answered from the shared readings.

The metric (`work-items`) is the number of items that need a replica: `depth + pending` from the Work
API's stats, i.e. items waiting in the queue plus items a worker has polled but not yet acknowledged.
With the trigger's `includeInProgress: "true"` it also counts the items in progress (acknowledged or
leased, counted from the Work API's list): the load rather than the backlog, so a busy fleet with nothing
waiting stays active and keeps its replicas. With `targetItemsPerReplica` T the HPA asks for
ceil(items / T) replicas; see docs/scaler.md.

Nothing a client sent is repeated in an answer: the metric name is always the scaler's own, and errors
name the scaler's keys, never the client's strings.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import grpc

from ..core.edge._status import abort, build_status, from_work_api
from ..keda import externalscaler_pb2 as pb
from ..keda import externalscaler_pb2_grpc as pb_grpc
from ..workapi import NotFoundError, WorkApiError
from . import _metadata, _telemetry
from ._config import ScalerConfig
from ._readings import ReaderEvicted, Reading, Readings, StaleReading, TooManyItems

METRIC_NAME = "work-items"

Context = grpc.aio.ServicerContext[object, object]


class ExternalScalerService(pb_grpc.ExternalScalerServicer):
    def __init__(self, config: ScalerConfig, readings: Readings) -> None:
        self.config = config
        self.readings = readings

    # -- helpers -----------------------------------------------------------------------------------

    async def _query(self, ref: pb.ScaledObjectRef, context: Context) -> _metadata.Query:
        try:
            return _metadata.parse(
                ref.scalerMetadata,
                environment_id=self.config.environment_id,
                target=self.config.target_items,
                activation=self.config.activation_threshold,
            )
        except _metadata.MetadataError as exc:
            metadata = {"key": exc.key} if exc.key else {"did_you_mean": exc.hint} if exc.hint else {}
            await abort(
                context, build_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_SCALER_METADATA", metadata)
            )

    async def _reading(self, query: _metadata.Query, context: Context) -> Reading:
        try:
            reader = self.readings.get(query.environment_id)
            return await reader.current(self.config.first_reading_timeout, in_progress=query.include_in_progress)
        except OverflowError as exc:
            await abort(context, build_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "TOO_MANY_ENVIRONMENTS"))
        except NotFoundError as exc:
            await abort(context, _not_found(exc, query.environment_id))
        except TooManyItems as exc:
            metadata = {"environment_id": query.environment_id, "flag": "--max-list-pages"}
            status = build_status(grpc.StatusCode.FAILED_PRECONDITION, str(exc), "TOO_MANY_ITEMS", metadata)
            await abort(context, status)
        except ReaderEvicted as exc:
            await abort(context, build_status(grpc.StatusCode.UNAVAILABLE, str(exc), "TOO_MANY_NEW_ENVIRONMENTS"))
        except WorkApiError as exc:
            await abort(context, from_work_api(exc))
        except StaleReading:
            await abort(
                context,
                build_status(
                    grpc.StatusCode.UNAVAILABLE,
                    "no queue stats reading yet",
                    "STATS_UNAVAILABLE",
                    {"environment_id": query.environment_id},
                ),
            )

    # -- the RPCs ----------------------------------------------------------------------------------

    @_telemetry.observed("IsActive")
    async def IsActive(self, request: pb.ScaledObjectRef, context: Context) -> pb.IsActiveResponse:
        query = await self._query(request, context)
        reading = await self._reading(query, context)
        return pb.IsActiveResponse(result=reading.items(query.include_in_progress) > query.activation)

    async def StreamIsActive(self, request: pb.ScaledObjectRef, context: Context) -> AsyncIterator[pb.IsActiveResponse]:
        """The current answer at once, then every change, within one stats interval of the read that saw it."""
        started = time.monotonic()
        try:
            query = await self._query(request, context)
            reading = await self._reading(query, context)
        except BaseException:
            _telemetry.record_call("StreamIsActive", _telemetry.status_of(context), time.monotonic() - started)
            raise
        include = query.include_in_progress
        active = reading.items(include) > query.activation
        _telemetry.record_call("StreamIsActive", grpc.StatusCode.OK, time.monotonic() - started)
        yield pb.IsActiveResponse(result=active)
        reader = self.readings.get(query.environment_id)
        async for update in reader.updates(in_progress=include):
            if isinstance(update, WorkApiError):
                continue  # a failed read changes nothing; the stream stays open while reads recover
            now = update.items(include) > query.activation
            if now != active:
                active = now
                yield pb.IsActiveResponse(result=active)

    @_telemetry.observed("GetMetricSpec")
    async def GetMetricSpec(self, request: pb.ScaledObjectRef, context: Context) -> pb.GetMetricSpecResponse:
        query = await self._query(request, context)
        spec = pb.MetricSpec(
            metricName=METRIC_NAME, targetSize=max(1, math.ceil(query.target)), targetSizeFloat=query.target
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    @_telemetry.observed("GetMetrics")
    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Context) -> pb.GetMetricsResponse:
        if request.metricName not in ("", METRIC_NAME):
            await abort(
                context,
                build_status(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown metric name: this scaler serves one metric, {METRIC_NAME}",
                    "UNKNOWN_METRIC",
                    {"metric_name": METRIC_NAME},
                ),
            )
        query = await self._query(request.scaledObjectRef, context)
        reading = await self._reading(query, context)
        items = reading.items(query.include_in_progress)
        value = pb.MetricValue(metricName=METRIC_NAME, metricValue=items, metricValueFloat=float(items))
        return pb.GetMetricsResponse(metricValues=[value])

    @_telemetry.observed("StreamMetricSpec")
    async def _stream_metric_spec_unimplemented(self, request: pb.ScaledObjectRef, context: Context) -> None:
        await abort(
            context,
            build_status(
                grpc.StatusCode.UNIMPLEMENTED,
                "StreamMetricSpec is not implemented: the metric spec only changes with the trigger's metadata",
                "NOT_IMPLEMENTED",
            ),
        )

    async def StreamMetricSpec(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[pb.GetMetricSpecResponse]:
        """Optional in KEDA's API: the target comes from the trigger's metadata and never changes on its own."""
        await self._stream_metric_spec_unimplemented(request, context)
        yield pb.GetMetricSpecResponse()  # pragma: no cover  (makes this an async generator)


def _not_found(exc: NotFoundError, environment_id: str) -> grpc.Status:
    metadata = {"environment_id": environment_id, "operation": exc.operation or ""}
    if exc.request_id:
        metadata["request_id"] = exc.request_id
    return build_status(
        grpc.StatusCode.NOT_FOUND,
        "the Work API knows no such environment (or none this key may read): check environmentId and --environment-id",
        "ENVIRONMENT_NOT_FOUND",
        metadata,
    )
