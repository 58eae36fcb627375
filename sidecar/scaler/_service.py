"""KEDA's `externalscaler.ExternalScaler`, answered from the shared readings.

The metric (`work-items`) is the number of items that need a replica: `depth + pending` from the Work
API's stats, i.e. items waiting in the queue plus items a worker has polled but not yet acknowledged.
Items already running (acknowledged, heartbeating) are not in the stats, so they are not in the metric:
the metric is the *backlog*, not the load. With `targetItemsPerReplica` T the HPA asks for
ceil(items / T) replicas for the backlog alone; see docs/scaler.md for what that means at scale-in.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc

from ..core._status import abort, build_status, from_work_api
from ..keda import externalscaler_pb2 as pb
from ..keda import externalscaler_pb2_grpc as pb_grpc
from ..workapi import WorkApiError
from . import _metadata
from ._config import ScalerConfig
from ._readings import Reading, Readings, StaleReading

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
            metadata = {"key": exc.key, "scaled_object": f"{ref.namespace}/{ref.name}"}
            await abort(
                context, build_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_SCALER_METADATA", metadata)
            )

    async def _reading(self, query: _metadata.Query, context: Context) -> Reading:
        try:
            reader = self.readings.get(query.environment_id)
        except OverflowError as exc:
            await abort(context, build_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "TOO_MANY_ENVIRONMENTS"))
        try:
            return await reader.current(self.config.first_reading_timeout)
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

    async def IsActive(self, request: pb.ScaledObjectRef, context: Context) -> pb.IsActiveResponse:
        query = await self._query(request, context)
        reading = await self._reading(query, context)
        return pb.IsActiveResponse(result=reading.items > query.activation)

    async def StreamIsActive(self, request: pb.ScaledObjectRef, context: Context) -> AsyncIterator[pb.IsActiveResponse]:
        """The current answer at once, then every change, within one stats interval of the read that saw it."""
        query = await self._query(request, context)
        reading = await self._reading(query, context)
        active = reading.items > query.activation
        yield pb.IsActiveResponse(result=active)
        reader = self.readings.get(query.environment_id)
        async for update in reader.updates():
            if isinstance(update, WorkApiError):
                continue  # a failed read changes nothing; the stream stays open while reads recover
            now = update.items > query.activation
            if now != active:
                active = now
                yield pb.IsActiveResponse(result=active)

    async def GetMetricSpec(self, request: pb.ScaledObjectRef, context: Context) -> pb.GetMetricSpecResponse:
        query = await self._query(request, context)
        spec = pb.MetricSpec(
            metricName=METRIC_NAME, targetSize=max(1, math.ceil(query.target)), targetSizeFloat=query.target
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Context) -> pb.GetMetricsResponse:
        query = await self._query(request.scaledObjectRef, context)
        reading = await self._reading(query, context)
        value = pb.MetricValue(
            metricName=request.metricName or METRIC_NAME,
            metricValue=reading.items,
            metricValueFloat=float(reading.items),
        )
        return pb.GetMetricsResponse(metricValues=[value])

    async def StreamMetricSpec(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[pb.GetMetricSpecResponse]:
        """Optional in KEDA's API: the target comes from the trigger's metadata and never changes on its own."""
        await abort(
            context,
            build_status(
                grpc.StatusCode.UNIMPLEMENTED,
                "StreamMetricSpec is not implemented: the metric spec only changes with the trigger's metadata",
                "NOT_IMPLEMENTED",
            ),
        )
        yield pb.GetMetricSpecResponse()  # pragma: no cover  (makes this an async generator)
