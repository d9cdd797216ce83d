"""The ``kiapi`` command, split by audience: ``server`` (serve, worker), ``admin`` (plugins,
config, activate, deactivate, status), ``install`` (install, uninstall plugins) and ``client``
(generate, jobs, files, over HTTP), ``webhooks`` (signing secrets).

Plugins add subcommands through the ``register_commands`` hook.
"""

from __future__ import annotations

import importlib
import sys

import click

from kiapi_core.cli.startup import gc_paused
from kiapi_core.version import DISTRIBUTION

# name -> (module, attribute). A command's module is imported when the command is run (or
# --help lists it): `kiapi serve` does not pay for the admin, install and client commands.
HOST = {
    "serve": ("server", "serve"),
    "worker": ("server", "worker"),
    "plugins": ("admin", "plugins"),
    "config": ("admin", "config"),
    "activate": ("admin", "activate"),
    "deactivate": ("admin", "deactivate"),
    "status": ("admin", "status"),
    "install": ("install", "install"),
    "uninstall": ("install", "uninstall"),
    "generate": ("client", "generate"),
    "jobs": ("client", "jobs"),
    "files": ("client", "files"),
    "webhooks": ("webhooks", "webhooks"),
}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*HOST, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in HOST and cmd_name not in self.commands:
            module, attr = HOST[cmd_name]
            command = getattr(importlib.import_module(f"kiapi_core.cli.{module}"), attr)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
@click.version_option(package_name=DISTRIBUTION, prog_name="kiapi")
def cli() -> None:
    """kiapi: a local HTTP host for AI models, extended by pip-installable plugins."""


def main() -> None:
    with gc_paused():
        _add_plugin_commands(sys.argv[1:])
    sys.exit(cli.main(prog_name="kiapi"))


def _add_plugin_commands(args: list[str]) -> None:
    from pydantic import ValidationError

    from kiapi_core.cli.startup import quiet_plugin_log
    from kiapi_core.plugins import HOST_COMMANDS, PluginError, build_registry, plugin_commands
    from kiapi_core.settings import ConfigFileError, Settings

    if args and args[0] in HOST_COMMANDS:
        # A host command needs no plugin command; those that need the plugins load them
        # themselves, so their errors are reported once.
        return
    try:
        settings = Settings()
    except (ValidationError, ConfigFileError):
        # The command itself reports bad settings, with the fix; plugin commands just go missing.
        return
    try:
        # Loaded whole (all-or-nothing, with collisions): a refused plugin has no commands.
        # Its errors are `kiapi plugins`'s to show.
        with quiet_plugin_log():
            registry = build_registry(settings)
        plugin_commands(registry, cli)
    except PluginError as exc:
        click.echo(
            f"Error: {exc} (KIAPI_STRICT_PLUGINS=1 stops at the first plugin error)", err=True
        )
        sys.exit(1)
