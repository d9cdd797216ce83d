"""The ``kiapi`` command, split by audience: ``server`` (serve, worker), ``admin`` (plugins,
config, activate, deactivate, status), ``install`` (install, uninstall plugins) and ``client``
(generate, jobs, files, over HTTP).

Plugins add subcommands through the ``register_commands`` hook.
"""

from __future__ import annotations

import sys

import click

from kiapi_core.cli import admin, client, install, server
from kiapi_core.cli.startup import gc_paused
from kiapi_core.version import DISTRIBUTION


@click.group()
@click.version_option(package_name=DISTRIBUTION, prog_name="kiapi")
def cli() -> None:
    """kiapi: a local HTTP host for AI models, extended by pip-installable plugins."""


for command in (
    server.serve,
    server.worker,
    admin.plugins,
    admin.config,
    admin.activate,
    admin.deactivate,
    admin.status,
    install.install,
    install.uninstall,
    client.generate,
    client.jobs,
    client.files,
):
    cli.add_command(command)


def main() -> None:
    with gc_paused():
        _add_plugin_commands()
    sys.exit(cli.main(prog_name="kiapi"))


def _add_plugin_commands() -> None:
    from pydantic import ValidationError

    from kiapi_core.plugins import PluginError, load_plugins, plugin_commands
    from kiapi_core.settings import ConfigFileError, Settings

    try:
        settings = Settings()
    except (ValidationError, ConfigFileError):
        # The command itself reports bad settings, with the fix; plugin commands just go missing.
        return
    try:
        pm, infos = load_plugins(settings)
        plugin_commands(pm, infos, cli, settings)
    except PluginError as exc:
        click.echo(
            f"Error: {exc} (KIAPI_STRICT_PLUGINS=1 stops at the first plugin error)", err=True
        )
        sys.exit(1)
