"""``edgefleet demo`` (the click command): runs the demo, or one of its fault scenarios, and prints
the summary. The topology itself is ``cloud.demo.runner.Demo``; scenarios are ``cloud.demo.scenarios``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from cloud.demo import runtime as rt
from cloud.demo.runner import SCENARIO_NAMES, Demo
from cloud.errors import DemoInterruptedError, SupervisorError


@click.command()
@click.option("--devices", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--edges", type=click.IntRange(1, 20), default=2, show_default=True)
@click.option(
    "--duration",
    type=click.FloatRange(10, 86400),
    default=120.0,
    show_default=True,
    help="seconds of streaming once the first model serves (drift is injected half-way)",
)
@click.option(
    "--drift",
    type=click.FloatRange(0, 1),
    default=1.0,
    show_default=True,
    help="drift of the simulated machines injected half-way (0 = none)",
)
@click.option(
    "--wait-recovery",
    type=click.FloatRange(0, 3600),
    default=0.0,
    show_default=True,
    help="after --duration, keep streaming up to this many seconds until accuracy has recovered",
)
@click.option("--headless", is_flag=True, help="plain progress lines instead of the live dashboard")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout at the end")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where the registry, models and run state live  [default: var/demo; with --dataset: "
    "var/demo-<dataset>, so that its registry and uplinked samples stay apart]",
)
@click.option("--reset", is_flag=True, help="start from an empty registry (train the first model again)")
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="auto: mosquitto when installed, else the embedded amqtt broker",
)
@click.option(
    "--devices-in-one-process",
    is_flag=True,
    help="run the simulated devices as threads of one process (one MqttLink each)",
)
@click.option(
    "--deploy",
    "deploy_mode",
    type=click.Choice(["rollout", "direct"]),
    default="rollout",
    show_default=True,
    help="how retrained models reach the edges: a canary then a wave (rollout engine), or all at once",
)
@click.option(
    "--scenario",
    type=click.Choice(SCENARIO_NAMES),
    default=None,
    help="fault injection instead of drift: baseline, fault, heal, recovery, accounting "
    "(docs/demo.md#scenarios); exits 1 if a window was lost uncounted or service did not recover",
)
@click.option(
    "--console-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="port of the web console on 127.0.0.1 (default: a free port); its sign-in link goes to stderr",
)
@click.option("--no-console", is_flag=True, help="do not start the web console")
@click.option(
    "--dataset",
    default=None,
    metavar="aeon:NAME|FILE.npz",
    help="real data instead of simulated machines: the first model trains on the dataset's train split, "
    "each device replays a labelled shard of its test split; drift: a class held out of the first "
    "model's data joins the replay half-way (3 classes or more; docs/demo.md)",
)
def demo(  # noqa: PLR0917 - click passes every option
    devices: int,
    edges: int,
    duration: float,
    drift: float,
    wait_recovery: float,
    headless: bool,
    as_json: bool,
    data_dir: Path | None,
    reset: bool,
    broker_kind: str,
    devices_in_one_process: bool,
    deploy_mode: str,
    scenario: str | None,
    console_port: int | None,
    no_console: bool,
    dataset: str | None,
) -> None:
    """Run the whole topology here: broker, Redis/Celery, cloud worker/beat/ingest/console, edges, devices.

    Trains the first model if there is none (a later run on the same data dir starts again from that
    model: it is rolled back out to the edges), rolls it out, streams, injects drift half-way, and lets
    the learning loop recover. Prints the web console's one-time sign-in link on stderr. Ctrl-C
    stops every process it started. Exits 1 if windows were lost.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if data_dir is None:
        data_dir = Path("var/demo") if dataset is None else Path(f"var/demo-{rt.dataset_model_name(dataset)}")
    options = rt.DemoOptions(
        devices=devices,
        edges=edges,
        duration_s=duration,
        drift=drift,
        wait_recovery_s=wait_recovery,
        data_dir=data_dir,
        reset=reset,
        devices_in_one_process=devices_in_one_process,
        broker=broker_kind,
        scenario=scenario,
        deploy_mode=deploy_mode,
        console=not no_console,
        console_port=console_port,
        dataset=dataset,
    )
    if dataset is not None and scenario is not None:
        raise click.UsageError(
            "--dataset runs the learning loop on real data; it does not combine with --scenario"
        )
    headless = headless or not sys.stdout.isatty()
    runner: Demo
    if scenario is not None:
        from cloud.demo.scenarios import ScenarioDemo  # noqa: PLC0415  (numpy and the scenarios: only with --scenario)

        options.drift = 0.0
        runner = ScenarioDemo(options, headless=headless, as_json=as_json)
    else:
        runner = Demo(options, headless=headless, as_json=as_json)
    try:
        # The live dashboard (unless headless) starts once the console's sign-in link is printed.
        summary = runner.run()
    except DemoInterruptedError as exc:
        click.echo(f"demo: {exc} received; every process it started is stopped", err=True)
        sys.exit(130)
    except SupervisorError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif scenario is not None:
        from cloud.demo.scenarios import print_outcome  # noqa: PLC0415  (numpy and the scenarios: only with --scenario)

        print_outcome(summary)
    else:
        _print_summary(summary)
    failed = False
    if summary["windows"]["lost"] != 0:
        click.echo(f"demo: {summary['windows']['lost']} windows lost", err=True)
        failed = True
    if scenario is not None and not summary["scenario"]["ok"]:
        click.echo(f"demo: scenario {scenario} failed: {summary['scenario']['problems']}", err=True)
        failed = True
    if failed:
        sys.exit(1)


def _print_summary(summary: dict[str, Any]) -> None:
    w, a = summary["windows"], summary["accuracy"]
    click.echo(
        f"windows sent {w['sent']}, processed {w['processed']}, lost {w['lost']}, "
        f"duplicated {w['duplicated']}, "
        f"pending on devices {w['pending_on_devices']}, dropped (counted) {w['dropped_counted_on_devices']}\n"
        f"decisions {summary['decisions']}; models published {', '.join(summary['models']['published'])}\n"
        f"accuracy before drift {a['before_drift']}, after drift {a['after_drift']}, "
        f"after recovery {a['after_recovery']}; seconds to recover {summary['seconds_to_recover']}"
    )
