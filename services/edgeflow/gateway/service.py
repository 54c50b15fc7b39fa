"""The gateway service: Recommend(surface, member, k, debug) over the surface's workflow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import redis

from edgeflow.candidates.service import ListsOnly
from edgeflow.config import Config
from edgeflow.experiments import records
from edgeflow.experiments.stream_log import StreamLog
from edgeflow.gateway.engine import Clients, Engine, NodeFailed, Outcome, UnknownMember
from edgeflow.gateway.explain import explanation
from edgeflow.gateway.models import ModelWatch, Move
from edgeflow.gateway.shadow import ShadowRunner
from edgeflow.merging import impressions
from edgeflow.merging.service import MergingService
from edgeflow.nearline import events
from edgeflow.shell import auth, metrics, tls
from edgeflow.shell.errors import RequestError
from edgeflow.shell.guard import RateLimitedLog
from edgeflow.shell.reload import Reloader
from edgeflow.shell.server import Service, channel, connect
from edgeflow.stores import keys
from edgeflow.stores.redis_client import AsyncClient, connect_async
from edgeflow.stores.resp import RawPipeline, RespError, RespReplyError, encode
from edgeflow.stores.resp_cluster import open_pipeline
from edgeflow.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
)
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.limits import clip, clip_text
from edgeflow.workflow.modes import served_workflows
from edgeflow.workflow.ops import BlendParams
from edgeflow.workflow.validate import WorkflowError, load_files, workflow_files

log = logging.getLogger("edgeflow.gateway")

MAX_K = 500
MAX_SURFACE_CHARS = 63  # a DNS label, as the workflow's surface
MAX_REQUEST_ID_CHARS = 128
MAX_ERROR_CHARS = 1000  # of a status message the gateway passes on from a backend
_CLOSE_TIMEOUT_S = 5.0
# Leave this much of the caller's deadline for building and sending the response.
_RESPONSE_MARGIN_S = 0.002


# Seconds an old channel stays open after a certificate renewal, for the calls on it.
RETIRE_S = 30.0


async def _close_later(channels: list[grpc.aio.Channel], delay_s: float) -> None:
    try:
        await asyncio.sleep(delay_s)
    finally:  # at once when the gateway stops first
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


class GatewayService(Service, gateway_pb2_grpc.RecommenderServicer):
    name = "gateway"
    service_names = ("edgeflow.v1.Recommender",)
    edge_facing = True

    def __init__(self, cfg: Config, workflows_dir: Path | None = None) -> None:
        self._cfg = cfg
        self._dir = workflows_dir or cfg.workflows_dir
        self.workflows: dict[str, Workflow] = {}
        self.rejected: list[str] = []  # workflow files refused at the last load
        self.models: ModelWatch | None = None  # the workflows' model references
        self._files: dict[str, Workflow] = {}  # the valid (or last valid) workflow per file
        self._refused: dict[str, str] = {}  # file -> why it is refused
        self._stamp: tuple[tuple[str, float, int], ...] = ()
        self._reload_log = RateLimitedLog(log, 60.0)
        self._channels: list[grpc.aio.Channel] = []
        self._renewal = tls.Renewal(None)
        self._retired: set[asyncio.Task[None]] = set()  # old channels closing after a grace
        self._engine: Engine | None = None
        self._local_merging: MergingService | None = None
        self._local_candidates: ListsOnly | None = None
        self._watch = Reloader("workflow reload", cfg.reload_interval_s, self._look_again, log)
        self._rds: AsyncClient | None = None  # member events (Publish)
        self._logs_redis: RawPipeline | None = None  # exposure and shadow streams
        self._state: RawPipeline | None = None  # members' deactivated markers
        self.exposures: StreamLog | None = None
        self._shadow_log: StreamLog | None = None
        self._shadows: ShadowRunner | None = None

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_RecommenderServicer_to_server(self, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not self._cfg.auth:
            return []
        store = auth.KeyStore(self._cfg.keys_path)
        if not store.key_count():
            log.warning("API keys are on but %s holds none: every call is refused "
                        "(`edgeflow auth create-key`)", self._cfg.keys_path)  # fmt: skip
        return [auth.AuthInterceptor(store)]

    async def start(self) -> None:
        self._load_workflows()
        if not self.workflows:
            refused = f" ({len(self.rejected)} files refused: see the log)" if self.rejected else ""
            raise RuntimeError(f"no valid workflow in {self._dir}{refused}")
        cfg = self._cfg
        peers = (cfg.candidates_addr, cfg.features_addr, cfg.scoring_addr, cfg.merging_addr)
        tls_files = tls.load(cfg.tls_dir)
        self._renewal = tls.Renewal(tls_files)
        chans = [channel(a, tls_files=tls_files) for a in peers]
        self._channels = chans
        # Merging's own code in process: the blend and filters still run if it is down.
        self._local_merging = MergingService(cfg, graph=False)  # no social proof: no graph here
        await self._local_merging.start()
        self._local_candidates = ListsOnly(cfg)  # precomputed lists, if candidates is down
        self._engine = Engine(
            Clients.over(*chans), batching=cfg.candidate_batches,
            local_merging=self._local_merging, local_candidates=self._local_candidates,
        )  # fmt: skip
        self.models = ModelWatch(chans[2], cfg.scoring_addr)
        # One quick look before serving, so that the first requests are already routed
        # around a broken variant; a scoring service that is not up yet is asked again later.
        # Beside it, the backends' connections are opened now, not by the first request.
        await asyncio.gather(self.models.refresh(timeout_s=1.0), connect(chans, 1.0))
        self.models.update(self.workflows)
        self._watch.start()
        self._rds = connect_async(cfg.redis_url)  # connects on first use
        # One writer per stream, each with one batch in flight: two connections at most.
        self._logs_redis = open_pipeline(cfg.redis_url, size=2)
        self._state = open_pipeline(cfg.redis_url)
        self.exposures = StreamLog(
            self._logs_redis,
            records.EXPOSURES,
            records.STREAM_MAXLEN,
            on_written=metrics.EXPOSURES_LOGGED.inc,
            on_dropped=lambda reason, n: metrics.EXPOSURES_DROPPED.labels(reason).inc(n),
        )
        self._shadow_log = StreamLog(self._logs_redis, records.SHADOW, records.STREAM_MAXLEN)
        self.exposures.start()
        self._shadow_log.start()
        self._shadows = ShadowRunner(self._engine, self._shadow_log)

    async def warm(self) -> None:
        # The stand-ins first: they run when a backend is down, the worst moment to open
        # connections. Then every surface once, through the engine alone: no exposure is
        # counted or logged.
        assert self._engine is not None
        assert self._local_merging is not None and self._local_candidates is not None
        await self._local_merging.warm()
        await self._local_candidates.warm()
        for wf in list(self.workflows.values()):
            budget = wf.spec.budget_ms / 1000.0
            with contextlib.suppress(UnknownMember, NodeFailed):
                await asyncio.gather(
                    self._deactivated(0, budget), self._engine.run(wf, 0, 10, budget)
                )

    async def stop(self) -> None:
        await self._watch.close()
        if self._shadows is not None:
            await self._shadows.close()
        for stream_log in (self.exposures, self._shadow_log):
            if stream_log is not None:
                await stream_log.close()
        retired = list(self._retired)
        for task in retired:
            task.cancel()
        await asyncio.gather(*retired, return_exceptions=True)
        closing = [ch.close() for ch in self._channels]
        if self._engine is not None:
            closing.append(self._engine.close())
        if self._local_merging is not None:
            closing.append(self._local_merging.stop())
        if self._local_candidates is not None:
            closing.append(self._local_candidates.close())
        try:  # a peer that never answers must not keep the process from exiting
            await asyncio.wait_for(asyncio.gather(*closing), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("peer channels did not close within %.0f s", _CLOSE_TIMEOUT_S)
        if self._rds is not None:
            await self._rds.aclose()
        for pipe in (self._logs_redis, self._state):
            if pipe is not None:
                await pipe.close()

    # ---- workflows -----------------------------------------------------------------------
    def _files_stamp(self) -> tuple[tuple[str, float, int], ...]:
        stamp = []
        for path in workflow_files(self._dir):
            try:
                st = path.stat()
            except OSError:  # removed since the listing
                continue
            stamp.append((str(path), st.st_mtime, st.st_size))
        return tuple(stamp)

    def _scan(
        self,
    ) -> tuple[tuple[tuple[str, float, int], ...], dict[str, Workflow], list[WorkflowError]] | None:
        """The workflow files, loaded again if any changed since the last load; None if none
        did. Blocking (it reads and parses): the watcher runs it off the event loop."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return None
        files, errors = load_files(self._dir)
        return stamp, files, errors

    def _load_workflows(self) -> None:
        scan = self._scan()
        if scan is not None:
            self._apply(*scan)

    def _apply(
        self,
        stamp: tuple[tuple[str, float, int], ...],
        files: dict[str, Workflow],
        errors: list[WorkflowError],
    ) -> None:
        """Serve the valid files. A file that is refused now keeps its last valid version
        serving (unless another file now serves its surface); a file that is gone takes its
        surface with it. Each refusal is logged and counted once, until it changes."""
        refused = {err.source for err in errors}
        surfaces = {wf.surface for wf in files.values()}
        kept: dict[str, Workflow] = {}
        for path, wf in self._files.items():
            if path in refused and wf.surface not in surfaces:
                kept[path] = wf
                surfaces.add(wf.surface)
        messages = {err.source: str(err) for err in errors}
        for source, message in messages.items():
            if self._refused.get(source) == message:
                continue  # logged and counted when it appeared
            metrics.WORKFLOW_REJECTIONS.inc()
            old = kept.get(source)
            note = f" (surface {old.surface!r} keeps its last valid version)" if old else ""
            log.error("workflow rejected%s: %s", note, message)
        for source in sorted(set(self._refused) - set(messages)):
            log.info("workflow file no longer rejected: %s", source)
        metrics.WORKFLOW_FILES_REJECTED.set(len(messages))
        self._refused = messages
        self.rejected = list(messages.values())
        self._files = {**files, **kept}
        workflows = served_workflows({wf.surface: wf for wf in self._files.values()})
        log.info("serving surfaces %s", sorted(workflows))
        self.workflows = workflows
        self._stamp = stamp
        if self.models is not None:  # with the models as last listed, until the next look
            self.models.update(self.workflows)

    async def _look_again(self) -> None:
        """Reload changed workflow files, and re-check every workflow's model references
        against what the scoring service has loaded now (a model published later clears
        its problem). Nothing a file holds stops the reloading."""
        try:
            scan = await asyncio.to_thread(self._scan)
            if scan is not None:
                self._apply(*scan)
        except Exception as exc:
            self._reload_log.warning("workflow reload failed: %r", exc)
        self._renew_channels()
        if self.models is not None:
            await self.models.refresh()
            self.models.update(self.workflows)

    def _renew_channels(self) -> None:
        """New channels to the backends when the certificate files were renewed; the old
        ones close once the calls on them have had time to finish."""
        files = self._renewal.check()
        if files is None or self._engine is None or self.models is None:
            return
        cfg = self._cfg
        peers = (cfg.candidates_addr, cfg.features_addr, cfg.scoring_addr, cfg.merging_addr)
        old, self._channels = self._channels, [channel(a, tls_files=files) for a in peers]
        self._engine.use(Clients.over(*self._channels), files)
        self.models.use(self._channels[2])
        task = asyncio.create_task(_close_later(old, RETIRE_S))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    # ---- RPCs ----------------------------------------------------------------------------
    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        surface = request.surface
        if len(surface) > MAX_SURFACE_CHARS:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"surface: at most {MAX_SURFACE_CHARS} characters, got {len(surface)}",
            )
        base = self.workflows.get(surface)
        if base is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"surface: unknown surface {clip(surface)}; known: {sorted(self.workflows)}",
            )
        if not 1 <= request.k <= MAX_K:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"k: must be between 1 and {MAX_K}, got {request.k}",
            )
        if request.member < 0:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"member: must be >= 0, got {request.member}"
            )
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id: at most {MAX_REQUEST_ID_CHARS} characters, "
                f"got {len(request.request_id)}",
            )
        assert self._engine is not None and base is not None
        wf, assignments = base.for_member(request.member)
        rerouted: tuple[Move, ...] = ()
        if assignments and self.models is not None:
            check = self.models.checks.get(base.surface)
            if check is not None and check.routes:
                routed = check.routes.get(assignments)
                if routed is not None:  # an assigned variant names a model not loaded
                    wf, assignments, rerouted = routed
        budget = wf.spec.budget_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - _RESPONSE_MARGIN_S)
        # The member's own state is read while the graph runs: it costs no time unless set.
        state = asyncio.ensure_future(self._deactivated(request.member, max(budget, 0.001)))
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            outcome = await self._engine.run(
                wf, request.member, request.k, budget, explain=request.explain
            )
        except UnknownMember as exc:
            failure = grpc.StatusCode.NOT_FOUND, str(exc)
        except NodeFailed as exc:
            code = exc.code
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                code = grpc.StatusCode.INTERNAL  # our own graph's call was wrong, not the caller's
            failure = code, clip_text(f"surface {wf.surface!r}: {exc}", MAX_ERROR_CHARS)
        except BaseException:
            state.cancel()
            raise
        refused = await state
        # A deactivated member is refused whatever the graph did; a state that could not be
        # read is named only when the graph (which says more about an outage) succeeded.
        if refused is not None and refused[0] == grpc.StatusCode.FAILED_PRECONDITION:
            raise RequestError(*refused)
        if failure is not None:
            raise RequestError(*failure)
        if refused is not None:
            raise RequestError(*refused)
        request_id = request.request_id or uuid.uuid4().hex
        resp = gateway_pb2.RecommendResponse(
            edges=outcome.frame.edges,
            partial=outcome.partial,
            degraded=outcome.degraded,
            surface=wf.surface,
            workflow=wf.name,
            request_id=request_id,
            assignments=[gateway_pb2.Assignment(experiment=e, variant=v) for e, v in assignments],
            rerouted=[gateway_pb2.Reroute(experiment=e, variant=v, served=s)
                      for e, v, s in rerouted],
        )  # fmt: skip
        if request.debug or request.explain:
            resp.funnel.nodes.extend(outcome.traces)
            resp.funnel.total_ms = outcome.total_ms
            for reason, count in outcome.frame.dropped.items():
                resp.funnel.dropped[reason] = count
        if request.explain:
            resp.explanation.CopyFrom(explanation(outcome))
        served = tuple(int(e.target) for e in outcome.frame.edges)
        # Metrics and the exposure record are written once the response is on its way.
        asyncio.get_running_loop().call_soon(
            self._record, request, request_id, wf, assignments, served, outcome, rerouted
        )
        self._start_shadows(base, request, request_id, served, outcome.total_ms, context)
        return resp

    async def _deactivated(
        self, member: int, timeout_s: float
    ) -> tuple[grpc.StatusCode, str] | None:
        """The refusal of a deactivated member (FAILED_PRECONDITION: it exists, but is not
        served until it is reactivated), or of a member whose state cannot be read."""
        assert self._state is not None
        try:
            [since] = await self._state.execute(
                encode(b"GET", keys.deactivated(member).encode()), 1, timeout_s
            )
        except (RespError, RespReplyError) as exc:
            return grpc.StatusCode.UNAVAILABLE, f"member: its state could not be read: {exc}"
        if since is None:
            return None
        try:
            when = f" (since {datetime.fromtimestamp(float(since), UTC):%Y-%m-%d %H:%M:%S} UTC)"
        except (ValueError, OverflowError):
            when = ""
        return grpc.StatusCode.FAILED_PRECONDITION, (
            f"member: {member} is deactivated{when}; it is served again, and recommended to "
            "others, after a reactivate event"
        )

    def _record(
        self,
        request: gateway_pb2.RecommendRequest,
        request_id: str,
        wf: Workflow,
        assignments: records.Assignments,
        served: tuple[int, ...],
        outcome: Outcome,
        rerouted: tuple[Move, ...] = (),
    ) -> None:
        variant = records.encode_assignments(assignments) or "none"
        metrics.observe_recommend(
            wf.surface, variant, outcome.total_ms / 1000, outcome.partial, outcome.traces
        )
        for exp, assigned, _ in rerouted:
            metrics.rerouted_requests(wf.surface, exp, assigned).inc()
        if self.exposures is None:
            return
        exposure = records.Exposure(
            request_id=request_id,
            time=time.time(),
            member=request.member,
            surface=wf.surface,
            workflow=wf.name,
            assignments=assignments,
            items=served,
            partial=outcome.partial,
        )
        rule = _impressions(wf)
        if rule is None or not served:
            self.exposures.put(exposure.encode())
            return
        count = impressions.count_command(request.member, served, exposure.time, rule.for_seconds)
        self.exposures.put(exposure.encode(), count, 1)

    def _start_shadows(
        self,
        base: Workflow,
        request: gateway_pb2.RecommendRequest,
        request_id: str,
        served: tuple[int, ...],
        served_ms: float,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Shadows start once the served response is sent, so they never delay it."""
        runner = self._shadows
        if runner is None or not base.shadows:
            return
        chosen = runner.chosen(base)
        if chosen:
            context.add_done_callback(
                lambda _: runner.start(
                    chosen, request.member, request.k, request_id, served, served_ms
                )
            )

    async def Publish(
        self, request: gateway_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PublishResponse:
        try:
            parsed = events.parse_request(
                request, self._cfg.event_max_future_s, self._cfg.event_max_age_s
            )
        except events.EventError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if self._rds is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "gateway: not started")
        assert self._rds is not None
        try:
            entry_ids = await events.publish(self._rds, parsed)
        except (redis.RedisError, OSError) as exc:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"publish: Redis at {self._cfg.redis_url} is unavailable: {exc}",
            ) from exc
        published = sum(1 for e in entry_ids if e)
        return gateway_pb2.PublishResponse(
            entry_ids=entry_ids,
            event_ids=[e.id for e in parsed],
            published=published,
            duplicates=len(entry_ids) - published,
        )

    async def ListSurfaces(
        self, request: gateway_pb2.ListSurfacesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListSurfacesResponse:
        """The served surfaces, what is wrong with each (model references the scoring
        service has not loaded) and the workflow files that were refused."""
        surfaces = sorted(self.workflows)
        resp = gateway_pb2.ListSurfacesResponse(surfaces=surfaces, rejected=self.rejected)
        if self.models is not None:
            resp.statuses.extend(self.models.status(s, self.workflows[s]) for s in surfaces)
        return resp


def _impressions(wf: Workflow) -> impressions.Rule | None:
    """The impressions rule of the blend whose list the workflow serves, if it has one."""
    params = wf.node(wf.spec.output).params
    if isinstance(params, BlendParams) and params.impressions is not None:
        return impressions.Rule.of(params.impressions)
    return None


def create(cfg: Config) -> Service:
    return GatewayService(cfg)
