"""The ``edgefleet`` console script. Each group imports its tier only when it is invoked,
so ``edgefleet agent ...`` on a device never imports numpy, TensorFlow or the cloud."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Final

import click

from shared import __version__
from shared.errors import EdgefleetError

# group name -> ("module:attribute", one-line help). Help is listed without importing the tier.
LAZY_GROUPS: Final[dict[str, tuple[str, str]]] = {
    "agent": ("device_agent.cli:agent", "Run the device agent on a device."),
    "edge": ("edge_node.cli:edge", "Run an edge node: LiteRT inference, local decisions, model swap."),
    "cloud": ("cloud.cli.cloud:cloud", "Run cloud services: ingest, Celery worker and beat, keys."),
    "model": ("cloud.cli.model:model", "Train, compress, evaluate and inspect models."),
    "fleet": ("cloud.cli.fleet:fleet", "List and inspect devices and edge nodes."),
    "rollout": ("cloud.cli.rollout:rollout", "Roll models out to edges, gated on quality."),
    "command": ("cloud.cli.command:command", "Send commands to devices and collect their acks."),
    "admin": ("cloud.cli.admin:admin", "Administration: API tokens."),
    "broker": ("cloud.cli.broker:broker", "Run the MQTT broker whose users and ACLs come from the registry."),
    "demo": ("cloud.demo.command:demo", "Run the whole topology on this machine."),
    "bench": ("shared.bench:bench", "Benchmarks that print JSON."),
    "tail": ("shared.tail:tail", "Print every message on the wire, decoded."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands live in modules imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name: the lazy groups and any registered eagerly."""
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import a lazy group's module on first use; a missing extra becomes a readable error."""
        if cmd_name in self._lazy:
            target, _help = self._lazy[cmd_name]
            module_name, attr = target.split(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                missing = exc.name or str(exc)
                raise click.ClickException(
                    f"'edgefleet {cmd_name}' needs {missing!r}, which is not installed: "
                    f"install the matching extra, e.g. pip install 'edgefleet[{_extra_for(cmd_name)}]'"
                ) from exc
            command: click.Command = getattr(module, attr)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:  # noqa: ARG002
        """List the lazy groups with their one-line help, without importing them."""
        rows = [(name, self._lazy[name][1]) for name in sorted(self._lazy)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _extra_for(group: str) -> str:
    return {"agent": "agent", "edge": "edge", "tail": "agent"}.get(group, "cloud")


@click.group(cls=LazyGroup, lazy=LAZY_GROUPS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    envvar="EDGEFLEET_LOG_LEVEL",
)
def cli(log_level: str) -> None:
    """edgefleet: machine learning across devices, edge nodes and the cloud."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """The console script: run the CLI, printing ``EdgefleetError`` as a one-line error (exit 2)."""
    try:
        cli.main(prog_name="edgefleet", standalone_mode=True)
    except EdgefleetError as exc:  # errors we raise on purpose carry a message for the user
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
