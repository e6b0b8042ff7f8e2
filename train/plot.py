"""A picture of a run: loss, KL, rewards/margins and the chosen/rejected rewards against
the step, train and held-out eval, from OUTPUT/metrics.jsonl, as a PNG.

    kto-plot OUTPUT               # writes OUTPUT/metrics.png (also: python -m train.plot)
    kto-plot OUTPUT --png run.png

A command of its own rather than a kto-train subcommand: kto-train is one command whose
options come from TrainConfig, and a group would change how every one of those command
lines parses. It reads only metrics.jsonl, so it also works on a run still in progress or
copied from another machine. Needs matplotlib: pip install 'kto-cache[plot]'."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import click

from shared.cli import user_errors
from shared.errors import ConfigError

# (panel title, metrics drawn in it)
PANELS = (("loss", ("loss",)), ("KL estimate z", ("kl",)),
          ("rewards/margins", ("rewards/margins",)),
          ("rewards (chosen, rejected)", ("rewards/chosen", "rewards/rejected")))
_COLORS = {"rewards/rejected": "tab:red"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: give the --output directory of a kto-train run")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: line {n} is not JSON ({err.msg})") from None
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a window without rows of a class (null) is a gap."""
    points = [(r["step"], math.nan if r[key] is None else r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def build_figure(records: list[dict[str, Any]], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    for ax, (name, keys) in zip(fig.subplots(2, 2).flat, PANELS, strict=True):
        for key in keys:
            color = _COLORS.get(key, "tab:blue")
            suffix = f" {key.split('/')[-1]}" if len(keys) > 1 else ""
            train, evaluation = series(records, key), series(records, f"eval_{key}")
            if train[0]:
                ax.plot(*train, color=color, linewidth=1.2, alpha=0.55, label=f"train{suffix}")
            if evaluation[0]:
                ax.plot(*evaluation, color=color, linewidth=2, linestyle="--", marker="o",
                        markersize=4, label=f"eval{suffix}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def plot_run(output: Path, png: Path | None = None) -> Path:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'kto-cache[plot]'") from None
    records = read_metrics(output / "metrics.jsonl")
    png = png or output / "metrics.png"
    steps = max((r["step"] for r in records), default=0)
    fig = build_figure(records, f"{output.resolve().name}: {steps} steps "
                                "(solid: train, dashed: eval)")
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, png)
    return png


@click.command("plot")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the picture.  [default: OUTPUT/metrics.png]")
@user_errors
def main(output: Path, png: Path | None) -> None:
    """Plot loss, KL and rewards of a kto-train run (OUTPUT/metrics.jsonl) as a PNG."""
    click.echo(plot_run(output, png))


if __name__ == "__main__":
    main()
