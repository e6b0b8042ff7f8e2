"""kto-train: not built yet (its issue follows kto-precompute)."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def main(args: tuple[str, ...]) -> None:
    """Policy-only KTO training from a kto-precompute cache: not built yet."""
    raise click.ClickException("kto-train is not built yet: this release ships kto-precompute "
                               "only. Verify a cache with `kto-precompute verify DIR`.")
