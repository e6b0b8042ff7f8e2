"""python -m train.plot: the curves drawn are metrics.jsonl's values (train and eval, gaps
where a class had no row), and the command writes a PNG or says what is missing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from train.plot import PANELS, build_figure, main

pytest.importorskip("matplotlib")

RECORDS = [
    {"step": 0, "epoch": 0.0, "eval_loss": 0.5, "eval_kl": 0.0, "eval_rewards/chosen": 0.0,
     "eval_rewards/rejected": 0.0, "eval_rewards/margins": 0.0},
    {"step": 1, "epoch": 0.1, "loss": 0.5, "kl": 0.0, "rewards/chosen": 0.0,
     "rewards/rejected": 0.0, "rewards/margins": 0.0},
    {"step": 2, "epoch": 0.2, "loss": 0.45, "kl": 1.5, "rewards/chosen": 0.8,
     "rewards/rejected": None, "rewards/margins": None},  # no rejected row in the window
    {"step": 4, "epoch": 0.4, "loss": 0.3, "kl": 2.5, "rewards/chosen": 1.2,
     "rewards/rejected": -0.9, "rewards/margins": 2.1},
    {"step": 4, "epoch": 0.4, "eval_loss": 0.4, "eval_kl": 2.0, "eval_rewards/chosen": 0.7,
     "eval_rewards/rejected": -0.3, "eval_rewards/margins": 1.0},
]


def drawn(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.lines}


def nan_as_none(values):
    return [None if v != v else v for v in values]


def test_figure_draws_the_metrics_of_each_panel():
    fig = build_figure(RECORDS, "run")
    loss, kl, margins, rewards = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [name for name, _ in PANELS]
    assert drawn(loss) == {"train": ([1, 2, 4], [0.5, 0.45, 0.3]), "eval": ([0, 4], [0.5, 0.4])}
    assert drawn(kl)["train"] == ([1, 2, 4], [0.0, 1.5, 2.5])
    steps, values = drawn(margins)["train"]
    assert steps == [1, 2, 4] and nan_as_none(values) == [0.0, None, 2.1]  # a gap, not 0
    lines = drawn(rewards)
    assert set(lines) == {"train chosen", "eval chosen", "train rejected", "eval rejected"}
    assert lines["eval rejected"] == ([0, 4], [0.0, -0.3])
    assert nan_as_none(lines["train rejected"][1]) == [0.0, None, -0.9]


def test_command_writes_a_png(tmp_path):
    import matplotlib.image

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    result = CliRunner().invoke(main, [str(tmp_path)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "metrics.png"
    assert result.output.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[:2] == (650, 1000)  # 10 x 6.5 in at 100 dpi
    other = tmp_path / "sub" / "x.png"
    other.parent.mkdir()
    assert CliRunner().invoke(main, [str(tmp_path), "--png", str(other)]).exit_code == 0
    assert other.is_file()


def test_a_folder_without_metrics_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "metrics.jsonl not found: give the --output directory of a kto-train run" in (
        result.output)


def test_a_run_without_eval_draws_no_eval_lines():
    fig = build_figure([r for r in RECORDS if "loss" in r], "run")
    assert all(not label.startswith("eval") for ax in fig.axes for label in drawn(ax))
