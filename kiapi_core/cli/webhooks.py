"""``kiapi webhooks``: the secret receivers verify signatures with, and rotating it."""

from __future__ import annotations

import click

from kiapi_core.cli.startup import settings_from
from kiapi_core.webhooks.signing import BadSecret, SecretKeeper, mask


def _keeper() -> SecretKeeper:
    settings = settings_from()
    configured = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    try:
        return SecretKeeper(settings.home, configured)
    except BadSecret as exc:
        raise click.ClickException(f"KIAPI_WEBHOOK_SECRET: {exc}") from None


@click.group()
def webhooks() -> None:
    """Webhook signing secrets (docs/jobs.md#webhooks)."""


@webhooks.command()
@click.option("--masked", is_flag=True, help="Show only the last characters of each.")
def secret(masked: bool) -> None:
    """Print the signing secrets, newest first (give receivers the first one)."""
    for value in _keeper().secrets():
        click.echo(mask(value) if masked else value)


@webhooks.command()
@click.option(
    "--drop-old",
    is_flag=True,
    help="End a rotation: keep only the newest secret (after receivers switched to it).",
)
def rotate(drop_old: bool) -> None:
    """Make a new secret that signs beside the previous one until --drop-old; the server
    picks it up at its next delivery. Prints the secrets now in use, newest first."""
    try:
        values = _keeper().rotate(drop_old=drop_old)
    except BadSecret as exc:
        raise click.ClickException(str(exc)) from None
    for value in values:
        click.echo(value)
