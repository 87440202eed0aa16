"""The root command group."""

from __future__ import annotations

import logging

import click

from promptq.cli import client, keys, limits, run, services, stack, usage


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="Python log level.")
def cli(log_level: str) -> None:
    """promptq: a self-hosted job queue for LLM prompts."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Alembic announces each plugin and its database dialect at INFO: noise before a
    # command's own output. Its migration steps (`Running upgrade ...`) still show.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


cli.add_command(stack.up)
for command in services.commands:
    cli.add_command(command)
cli.add_command(keys.keys)
cli.add_command(limits.limits)
cli.add_command(usage.usage)
cli.add_command(run.run)
for command in client.commands:
    cli.add_command(command)


def main() -> None:
    cli(prog_name="promptq")
