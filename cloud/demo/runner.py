"""``edgefleet demo``: the whole topology on this machine, the first model, drift half-way, and the
learning loop closing by itself (retrain -> compress -> gate -> sign -> publish -> edges swap)."""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType
from typing import Any

from cloud.demo import runtime as rt
from cloud.demo.supervisor import Supervisor, tail
from cloud.errors import DemoInterruptedError, SupervisorError
from shared.private_broker import free_port

logger = logging.getLogger(__name__)

# The names of cloud.demo.scenarios' SCENARIOS (kept here: the CLI must not import it eagerly).
SCENARIO_NAMES = (
    "broker-restart",
    "edge-kill",
    "cloud-partition",
    "device-offline",
    "bad-model",
    "malformed-flood",
)

SERVE_TIMEOUT_S = 240.0  # first model trained (or found) and swapped in on every edge
DRAIN_TIMEOUT_S = 30.0  # after the devices stop, edges finish what the broker still holds
REFRESH_S = 1.0
HEADLESS_EVERY_S = 5.0


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise DemoInterruptedError(signal.Signals(signum).name)


def _production(settings: Any, model_name: str) -> tuple[str | None, str | None, list[str]]:
    """(ref, version, deploy_edges of its run) of the production demo model, if any."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)

    with session_scope(settings.resolved_database_url) as session:
        model = crud.production_model(session, name=model_name)
        if model is None:
            return None, None, []
        run = crud.run_of(session, model=model)
        edges = list((run.config or {}).get("deploy_edges", [])) if run is not None else []
        return model.ref, model.version, edges


def _pipeline_status(settings: Any, model_name: str, since: float = 0.0) -> dict[str, Any]:
    """Latest run, its last step, retraining triggers fired since ``since`` (this run) and published
    versions (for the dashboard and the summary)."""
    from cloud.registry import crud  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope  # noqa: PLC0415  (SQLAlchemy: not for --help)

    with session_scope(settings.resolved_database_url) as session:
        run = crud.latest_run(session)
        triggers = [
            t
            for t in crud.all_triggers(session)
            if t.ts >= since and t.model_name == model_name and t.kind != rt.RESTART_TRIGGER_KIND
        ]
        published = [
            m.version
            for m in sorted(
                crud.list_model_versions(session, name=model_name, limit=1000), key=lambda m: m.id
            )
            if m.manifest is not None
        ]
        samples = crud.count_samples(session, labelled=True)
        rollout = _latest_rollout(session, model_name)
        return {
            "rollout": rollout,
            "run": None
            if run is None
            else {
                "id": run.id,
                "state": run.state,
                "step": run.steps[-1].step if run.steps else "queued",
                "trigger_id": run.trigger_id,
            },
            "triggers": [{"id": t.id, "kind": t.kind, "ts": t.ts, "reason": t.reason} for t in triggers],
            "published": published,
            "labelled_samples": samples,
        }


def _latest_rollout(session: Any, model_name: str) -> dict[str, Any] | None:
    """The newest rollout of the demo model: id, model, state, wave (1-based) of waves, edge states."""
    from cloud.registry import fleet  # noqa: PLC0415  (SQLAlchemy: not for --help)

    for rollout in fleet.list_rollouts(session, limit=5):
        if rollout.model.name == model_name:
            return {
                "id": rollout.rollout_id,
                "model": rollout.model.version,
                "state": rollout.state,
                "wave": f"{min(rollout.current_wave + 1, rollout.waves)}/{rollout.waves}",
                "targets": {t.edge_id: t.state for t in rollout.targets},
                "reason": rollout.reason,
            }
    return None


class Demo:
    """The default demo: start the topology, serve the first model, stream, inject drift half-way and
    watch the learning loop recover; scenarios subclass it."""

    def __init__(self, options: rt.DemoOptions, *, headless: bool, as_json: bool) -> None:
        self.options = options
        self.headless = headless
        self.as_json = as_json
        self.out = sys.stderr if as_json else sys.stdout
        self.sup: Supervisor | None = None
        self.topo: rt.Topology | None = None
        self.monitor: Any = None
        self.settings: Any = None
        self.phase = "starting"
        self.first_version: str | None = None
        self.serving_ts: float | None = None
        self.drift_ts: float | None = None
        self.drift_acks: int = 0
        self.stream_start: float | None = None
        self.status: dict[str, Any] = {}
        self._last_line = 0.0
        self._live: Any = None
        self.console_url: str | None = None
        self.broker_plan: rt.BrokerPlan | None = None
        self.started_at = time.time()
        self.restart: rt.Restart | None = None  # this run restarted from the bootstrap model
        self.replay: rt.ReplayPlan | None = None  # --dataset: what the devices replay

    # -- output ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Print one line of progress (above the live dashboard when there is one)."""
        if self._live is not None:
            self._live.console.print(text)
        else:
            print(text, file=self.out, flush=True)

    # -- lifecycle ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the demo to the end and return its summary; every process it started is stopped, even on
        Ctrl-C or SIGTERM."""
        options = self.options
        rt.prepare_dirs(options)
        self.sup = Supervisor(options.data_dir / "logs")
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            # Signals during cleanup must not interrupt it.
            for s in old:
                signal.signal(s, signal.SIG_IGN)
            self._shutdown()
            self._stop_dashboard()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _start_dashboard(self) -> None:
        """The live dashboard (unless headless), once the lines that must stay readable are printed."""
        if self.headless or self._live is not None:
            return
        from rich.live import Live  # noqa: PLC0415  (rich: only for the live dashboard)

        self._live = Live(self._render(), refresh_per_second=2, transient=False)
        self._live.start()

    def _stop_dashboard(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _start_console(self, topo: rt.Topology) -> None:
        """Serve the console and print its one-time sign-in link on stderr (stdout may be JSON)."""
        options = self.options
        if not options.console:
            return
        port = options.console_port or free_port()
        self.phase = "starting the console"
        rt.start_console(topo, port)
        # Valid for the whole run (it works once): the demo may stream for hours.
        ttl_s = max(3600.0, options.duration_s + options.wait_recovery_s + 2 * SERVE_TIMEOUT_S)
        secret = rt.console_signin_link(self.settings.resolved_database_url, ttl_s=ttl_s)
        self.console_url = f"http://127.0.0.1:{port}/"
        print(f"console: http://127.0.0.1:{port}/signin/link/{secret}", file=sys.stderr, flush=True)
        self.phase = "starting"

    def _shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.sup is not None:
            self.sup.stop()
            rt.reap_broker_leftovers(self.options.data_dir)

    def _run(self) -> dict[str, Any]:
        options, sup = self.options, self.sup
        assert sup is not None
        plan = rt.plan_broker(options)
        celery_env, celery_kind = rt.start_celery_transport(sup, options)
        env = rt.cloud_env(options, plan, celery_env)
        self.settings = settings = rt.load_cloud_settings(env)

        from cloud.fleet.desired_state import ensure_keys  # noqa: PLC0415  (pydantic, paho: not for --help)
        from cloud.registry.db import upgrade  # noqa: PLC0415  (SQLAlchemy + Alembic: not for --help)

        # Keys before identities (every bundle carries the cloud's public key), identities before the
        # broker (it reads its users from the registry), the broker before anything connects.
        ensure_keys(settings)
        upgrade(settings.resolved_database_url)
        if plan.kind == "amqtt" and options.edges > 1:
            self.say("demo: amqtt has no shared subscriptions, so edges cannot split devices: running 1 edge")
            options.edges = 1
        edge_ids = [f"edge-{i + 1}" for i in range(options.edges)]
        self.topo = topo = rt.Topology(
            options=options,
            supervisor=sup,
            broker_url=plan.url,
            broker_kind=plan.kind,
            celery_kind=celery_kind,
            cloud_env=env,
            edge_ids=edge_ids,
            device_ids=rt.device_ids(options.devices),
            broker_auth=plan.auth,
            cloud_broker_url=plan.cloud_url,
        )
        rt.enroll_topology(topo, settings)
        # The demo's own connections (desired state, scenarios) log in as the cloud identity too.
        self.settings = settings = rt.load_cloud_settings(topo.cloud_env)
        self.broker_plan = plan
        rt.start_broker(topo, plan)
        self.say(self._broker_line(topo, celery_kind))
        self._prepare_topology(topo)
        if options.dataset is not None:
            self._plan_replay(topo)
        # Before any cloud service: beat must not carry an older run's rollout on to the edges.
        self._restart_from_bootstrap(topo)
        self._start_cloud(topo)
        self._start_console(topo)
        self._start_dashboard()
        from cloud.demo.monitor import Monitor  # noqa: PLC0415  (pydantic, paho: not for --help)

        self.monitor = Monitor(
            plan.cloud_url,
            edge_ids=edge_ids,
            username=settings.broker.username,
            password=settings.broker.password.get_secret_value() if settings.broker.password else None,
        )
        self.monitor.start()
        rt.start_edges(topo)
        self._first_model()
        # Devices start once every edge serves (and so has subscribed): a broker keeps QoS1 messages
        # only for subscriptions that exist, so windows sent before that would be lost.
        rt.start_devices(topo, self.replay)
        self._wait_devices()
        self._stream()
        return self._finish()

    def _broker_line(self, topo: rt.Topology, celery_kind: str) -> str:
        if topo.per_identity:
            broker = (
                f"broker mosquitto (edgefleet broker run) at {topo.broker_url}, cloud listener "
                f"{topo.cloud_broker_url}; per-identity logins: {len(topo.bundles)} identities enrolled, "
                f"bundles in {topo.identities_dir}"
            )
        else:
            broker = f"broker amqtt at {topo.broker_url}, no authentication (the amqtt fallback: anonymous)"
        return f"demo: {broker}; Celery on {celery_kind}; data in {self.options.data_dir}"

    def _prepare_topology(self, topo: rt.Topology) -> None:
        """Hook before anything is started on the topology (fault-injection scenarios use it)."""

    def _plan_replay(self, topo: rt.Topology) -> None:
        """``--dataset``: the devices' test-split shards and the bootstrap's data (``rt.plan_replay``)."""
        self.phase = "preparing the dataset"
        self.replay = plan = rt.plan_replay(topo)
        drift = (
            f"drift: class {plan.held_out!r} is held out of the bootstrap's data and joins the replay "
            "half-way"
            if plan.held_out is not None
            else f"no drift: {plan.note}"
        )
        self.say(
            f"demo: {self.options.dataset}: {plan.test_rows} test rows of {plan.row_length} samples, "
            f"{len(plan.before)} replaying devices (a shard each, labelled, one row per window); {drift}"
        )
        if plan.held_out is None:
            self.options.drift = 0.0

    def _restart_from_bootstrap(self, topo: rt.Topology) -> None:
        """A kept registry: put the bootstrap model back in production and on the edges, so that every
        run shows the drop and the recovery (``rt.restart_from_bootstrap``)."""
        dataset = str(self.replay.base_dataset) if self.replay is not None else "vibration"
        # Runs an earlier demo left running would block every retraining trigger of this one.
        rt.close_stale_runs(self.settings, model_name=self.options.model_name, reason="a new demo started")
        found = rt.find_bootstrap(
            self.settings, model_name=self.options.model_name, edge_ids=topo.edge_ids, dataset=dataset
        )
        if found is None:
            return
        ref, _ = found
        self.restart = restart = rt.restart_from_bootstrap(
            self.settings, model_name=self.options.model_name, bootstrap=ref, edge_ids=topo.edge_ids
        )
        what = f"production was {restart.replaced}" if restart.replaced else "it was production"
        extra = (
            f"; rollouts aborted: {', '.join(restart.rollouts_aborted)}" if restart.rollouts_aborted else ""
        )
        self.say(
            f"demo: the registry is kept; restarting from the bootstrap model {ref} ({what}): promoted "
            f"and sent to {', '.join(topo.edge_ids)} as signed desired state{extra}"
        )

    def _start_cloud(self, topo: rt.Topology) -> None:
        rt.start_cloud(topo)

    def _first_model(self) -> None:
        topo, sup, settings = self.topo, self.sup, self.settings
        assert topo is not None
        assert sup is not None
        model_name = self.options.model_name
        ref, version, deployed_to = _production(settings, model_name)
        if self.restart is not None:
            ref, version = self.restart.model, self.restart.version  # published already
        elif ref is not None and sorted(deployed_to) == sorted(topo.edge_ids):
            from cloud.fleet.desired_state import publish_desired_state  # noqa: PLC0415  (pydantic, paho: not for --help)

            self.say(f"demo: production model {ref} found; deploying it to {', '.join(topo.edge_ids)}")
            publish_desired_state(settings=settings, edge_ids=topo.edge_ids, model_ref=ref, actor="demo")
        else:
            config = rt.pipeline_config_file(topo, self.replay.base_dataset if self.replay else None)
            self.say(f"demo: training the first model ({config}): train -> int8 -> gate -> sign -> publish")
            self.phase = "training first model"
            rt.start_cloud(topo, ("cloud-worker",))  # if a scenario started without it
            # The config file has the sizes (a replayed dataset's training budget too).
            train = sup.start(
                "train",
                # On the Celery worker: it imports TensorFlow now, not when drift strikes.
                [
                    *rt.edgefleet_argv(),
                    "model",
                    "train",
                    "--celery",
                    "--pipeline-config",
                    str(config),
                    # The command line's dataset and seed override the config file's (defaults included).
                    "--dataset",
                    str(self.replay.base_dataset) if self.replay else "vibration",
                    "--seed",
                    str(self.options.seed),
                ],
                env=topo.cloud_env,
            )
            while train.running:
                self._tick()
            if train.proc.returncode != 0:
                raise SupervisorError(
                    f"training the first model failed; {train.log_path}:\n{tail(train.log_path)}"
                )
            ref, version, _ = _production(settings, model_name)
            if ref is None:
                raise SupervisorError(f"the first model was not published; see {train.log_path}")
        self.first_version = version
        self.phase = f"rolling out {version}"
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while set(self.monitor.edge_models().values()) != {version}:
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"edges do not serve {version} after {SERVE_TIMEOUT_S:.0f} s: "
                    f"{self.monitor.edge_models()}"
                )
            self._tick()
        self.serving_ts = time.time()
        self.say(f"demo: {version} serving on every edge; starting {self.options.devices} devices")

    def _wait_devices(self) -> None:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        self.phase = "devices starting"
        while True:
            with self.monitor.lock:
                online = len(self.monitor.state.devices_online)
            if online >= self.options.devices:
                return
            if time.monotonic() > deadline:
                raise SupervisorError(f"only {online} of {self.options.devices} devices online")
            self._tick()

    def _stream(self) -> None:
        options = self.options
        start = time.monotonic()
        self.stream_start = start
        drift_at = start + options.duration_s * options.drift_at
        end = start + options.duration_s
        self.phase = "streaming"
        while time.monotonic() < end:
            if options.drift > 0 and self.drift_ts is None and time.monotonic() >= drift_at:
                self._inject_drift()
            self._tick()
        if self.drift_ts is None or options.drift == 0 or options.wait_recovery_s <= 0:
            return
        # A loaded machine trains slowly: optionally keep streaming until accuracy is back.
        limit = time.monotonic() + options.wait_recovery_s
        self.phase = "waiting for recovery"
        while not self._recovered() and time.monotonic() < limit:
            self._tick()

    def _recovered(self) -> bool:
        from cloud.demo.monitor import PHASE_WINDOW_S, recovery_time  # noqa: PLC0415  (pydantic, paho: not for --help)

        assert self.drift_ts is not None
        start = max(self.serving_ts or 0.0, self.drift_ts - PHASE_WINDOW_S)
        before, _ = self.monitor.accuracy(start, self.drift_ts, version=self.first_version)
        if before is None:
            return False
        seconds, _ = recovery_time(
            self.monitor.points(), drift_ts=self.drift_ts, baseline=before, first_model=self.first_version
        )
        # ... and the rollout is done: every edge serves the same newer model (a canary alone may
        # already have recovered the accuracy).
        serving = set(self.monitor.edge_models().values())
        return seconds is not None and len(serving) == 1 and serving != {self.first_version}

    def _inject_drift(self) -> None:
        from shared.schemas import CommandName  # noqa: PLC0415  (pydantic: not for --help)

        assert self.topo is not None
        if self.replay is not None:
            # A switch to the held-out part, at each device's next row boundary.
            for device_id in self.topo.device_ids:
                switch: dict[str, Any] = {"sensor": {"options": {"path": str(self.replay.after[device_id])}}}
                self.monitor.send_command(device_id, CommandName.SET_CONFIG, switch)
            self.drift_ts = time.time()
            self.phase = f"class {self.replay.held_out} joined the replay"
            self.say(
                f"demo: drift: every device now replays all its test rows, class {self.replay.held_out!r} "
                "(never seen by the bootstrap model) included; the loop must now recover by itself"
            )
            return
        args = {"sensor": {"options": {"drift": self.options.drift}}}
        for device_id in self.topo.device_ids:
            self.monitor.send_command(device_id, CommandName.SET_CONFIG, args)
        self.drift_ts = time.time()
        self.phase = f"drift {self.options.drift:g} injected"
        self.say(
            f"demo: drift {self.options.drift:g} injected into {len(self.topo.device_ids)} machines "
            "(set_config sensor.options.drift); the loop must now recover by itself"
        )

    def _tick(self) -> None:
        assert self.sup is not None
        rt.check_alive(self.sup)
        try:
            self.status = _pipeline_status(self.settings, self.options.model_name, self.started_at)
        except Exception as exc:  # noqa: BLE001 - the registry may be locked for a moment
            logger.debug("pipeline status unavailable: %s", exc)
        if self.headless:
            now = time.monotonic()
            if now - self._last_line >= HEADLESS_EVERY_S:
                self._last_line = now
                self.say(self._line())
        elif self._live is not None:
            self._live.update(self._render())
        time.sleep(REFRESH_S)

    # -- views -------------------------------------------------------------------------------------
    def _recent_accuracy(self) -> tuple[float | None, int]:
        now = time.time()
        accuracy: float | None
        accuracy, labelled = self.monitor.accuracy(now - 10.0, now + 1.0)
        return accuracy, int(labelled)

    def _line(self) -> str:
        m = self.monitor
        if m is None:
            return f"[{self.phase}]"
        acc, n = self._recent_accuracy()
        windows, dups, _, decisions = m.processed()
        with m.lock:
            online = len(m.state.devices_online)
        run = self.status.get("run") or {}
        models = ",".join(f"{e}={v or '-'}" for e, v in m.edge_models().items())
        acc_text = f"{acc:.3f} ({n})" if acc is not None else "-"
        return (
            f"[{self.phase}] devices {online}/{self.options.devices} | {m.rate():.1f} win/s | "
            f"processed {windows} dup {dups} | decisions {decisions} | acc10s {acc_text} | {models} | "
            f"run {run.get('id', '-')}:{run.get('state', '-')}/{run.get('step', '-')}"
            f"{_rollout_text(self.status.get('rollout'), short=True)}"
        )

    def _render(self) -> Any:
        from rich.table import Table  # noqa: PLC0415  (rich: only for the live dashboard)

        m = self.monitor
        table = Table(title=f"edgefleet demo — {self.phase}", expand=False)
        table.add_column("what")
        table.add_column("value")
        if m is None:
            return table
        acc, n = self._recent_accuracy()
        windows, dups, dead, decisions = m.processed()
        with m.lock:
            online = len(m.state.devices_online)
            edges = {e: (v.model_version, v.deploy_stage, v.online) for e, v in m.state.edges.items()}
        table.add_row("devices online", f"{online} / {self.options.devices}")
        table.add_row("windows/s (edges)", f"{m.rate():.1f}")
        table.add_row("windows processed / duplicates / dead letters", f"{windows} / {dups} / {dead}")
        table.add_row("decisions", str(decisions))
        table.add_row(
            "accuracy (last 10 s, labelled windows)", f"{acc:.3f} over {n}" if acc is not None else "-"
        )
        for edge_id, (version, stage, online_edge) in edges.items():
            table.add_row(
                f"{edge_id}",
                f"{'online' if online_edge else 'offline'}, model {version or '-'}"
                f"{f', deploy {stage}' if stage else ''}",
            )
        run = self.status.get("run")
        if run:
            table.add_row("pipeline run", f"#{run['id']} {run['state']} ({run['step']})")
        rollout = self.status.get("rollout")
        if rollout:
            table.add_row("rollout", _rollout_text(rollout, short=False))
        triggers = self.status.get("triggers") or []
        if triggers:
            table.add_row("last trigger", f"{triggers[-1]['kind']}: {triggers[-1]['reason']}")
        table.add_row("published models", ", ".join(self.status.get("published", [])) or "-")
        table.add_row("labelled samples in registry", str(self.status.get("labelled_samples", "-")))
        if self.stream_start is not None:
            left = self.options.duration_s - (time.monotonic() - self.stream_start)
            table.add_row("time left", f"{max(0.0, left):.0f} s")
        return table

    # -- the end -----------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        topo, sup, m = self.topo, self.sup, self.monitor
        assert topo is not None
        assert sup is not None
        self.phase = "stopping devices"
        sup.stop(topo.device_ids if not self.options.devices_in_one_process else ["devices"])
        tally, missing = rt.tally_devices(topo)
        expected = tally.created - tally.pending - tally.dropped
        self.phase = "draining"
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        stable_since, last = time.monotonic(), (-1, -1)
        while time.monotonic() < deadline:
            windows, dups, _, _ = m.processed()
            if (windows, dups) != last:
                last, stable_since = (windows, dups), time.monotonic()
            # Settled: everything the devices handed over is decided, or nothing moved for 3 reports.
            if windows >= expected or time.monotonic() - stable_since > 3 * self.options.metrics_interval_s:
                if windows >= expected:
                    time.sleep(self.options.metrics_interval_s + 0.5)  # one more report: late duplicates
                break
            self._tick()
        windows, dups, dead, decisions = m.processed()
        return self._summary(tally, missing, windows, dups, dead, decisions)

    def _summary(  # noqa: PLR0917 - the final counts
        self, tally: rt.DeviceTally, missing: list[str], windows: int, dups: int, dead: int, decisions: int
    ) -> dict[str, Any]:
        from cloud.demo.monitor import PHASE_WINDOW_S, recovery_time  # noqa: PLC0415  (pydantic, paho: not for --help)

        m, options = self.monitor, self.options
        status = _pipeline_status(self.settings, self.options.model_name, self.started_at)
        lost = tally.created - tally.pending - tally.dropped - windows
        points = m.points()
        first = self.first_version
        before = after = recovered = None
        n_before = n_after = n_recovered = 0
        seconds, recovered_version = None, None
        fleet_seconds: float | None = None  # drift -> the final model swapped in on the last edge
        if self.drift_ts is not None:
            start = max(self.serving_ts or 0.0, self.drift_ts - PHASE_WINDOW_S)
            before, n_before = m.accuracy(start, self.drift_ts, version=first)
            after, n_after = m.accuracy(
                self.drift_ts + options.metrics_interval_s + 0.5, time.time(), version=first
            )
            if before is not None:
                seconds, recovered_version = recovery_time(
                    points, drift_ts=self.drift_ts, baseline=before, first_model=first
                )
            final_versions = set(m.edge_models().values())
            newest = next(iter(final_versions)) if len(final_versions) == 1 else None
            if newest is not None and newest != first:
                swapped = [
                    ts
                    for ts, _, stage, version in m.state.deploy_events
                    if stage == "swapped" and version == newest
                ]
                # The first report after a swap may still hold windows the old model decided.
                if swapped:
                    fleet_seconds = max(swapped) - self.drift_ts
                since = (max(swapped) if swapped else self.drift_ts) + options.metrics_interval_s + 0.5
                recovered, n_recovered = m.accuracy(since, time.time(), version=newest)

        def rnd(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "devices": options.devices,
            "edges": options.edges,
            "duration_s": options.duration_s,
            "streamed_s": None
            if self.stream_start is None
            else round(time.monotonic() - self.stream_start, 1),
            "broker": self.topo.broker_kind if self.topo else None,
            "broker_auth": self.topo.broker_auth if self.topo else None,
            "celery": self.topo.celery_kind if self.topo else None,
            "devices_in_one_process": options.devices_in_one_process,
            "windows": {
                "sent": tally.created,
                "processed": windows,
                "lost": lost,
                "duplicated": dups,
                "pending_on_devices": tally.pending,
                "dropped_counted_on_devices": tally.dropped,
                "dead_letters": dead,
                "devices_without_state": missing,
            },
            "decisions": decisions,
            "models": {
                "first": first,
                "final_per_edge": m.edge_models(),
                "published": status["published"],
                # A kept registry: this run restarted from the bootstrap model, replacing this one.
                "restarted_from_bootstrap": self.restart is not None,
                "replaced_production": self.restart.replaced if self.restart else None,
            },
            "drift": self._drift_summary(),
            "accuracy": {
                "before_drift": rnd(before),
                "after_drift": rnd(after),
                "after_recovery": rnd(recovered),
                "labelled_windows": {
                    "before_drift": n_before,
                    "after_drift": n_after,
                    "after_recovery": n_recovered,
                },
            },
            "seconds_to_recover": None if seconds is None else round(seconds, 1),
            "seconds_to_final_model_everywhere": None if fleet_seconds is None else round(fleet_seconds, 1),
            "recovered_with": recovered_version,
            "rollout": status.get("rollout"),
            "triggers": [{"kind": t["kind"], "reason": t["reason"]} for t in status["triggers"]],
            "labelled_samples": status["labelled_samples"],
            "console_url": self.console_url,
            "dataset": None
            if self.replay is None
            else {
                "spec": options.dataset,
                "model_name": options.model_name,
                "test_rows": self.replay.test_rows,
                "row_length": self.replay.row_length,
                "held_out_class": self.replay.held_out,
            },
        }

    def _drift_summary(self) -> dict[str, Any]:
        drift: dict[str, Any] = {"value": self.options.drift, "injected": self.drift_ts is not None}
        if self.replay is not None:
            drift["kind"] = "held-out class" if self.replay.held_out is not None else "none"
            if self.replay.note:
                drift["note"] = self.replay.note
        return drift


def _rollout_text(rollout: dict[str, Any] | None, *, short: bool) -> str:
    if not rollout:
        return ""
    text = f"{rollout['id']} {rollout['model']} {rollout['state']} wave {rollout['wave']}"
    if short:
        return f" | rollout {text}"
    edges = ", ".join(f"{e} {state}" for e, state in rollout["targets"].items())
    reason = f"; {rollout['reason']}" if rollout.get("reason") else ""
    return f"{text} ({edges}){reason}"
