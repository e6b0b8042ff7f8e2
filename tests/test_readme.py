"""Every command shown in README.md is run by a test. The commands of the CLIs
(kto-precompute, kto-train, kto-plot, and accelerate launch of kto-train) run here, in the
README's order, on the tiny model: the README's placeholder MODEL becomes the tiny model's
folder, and its train.jsonl / eval.jsonl are small files of the README's example shape
written in the working folder. Console scripts run as ``python -m <module>`` of their
[project.scripts] entry (checked to be that entry). The benchmark commands are parsed by
their scripts (not run: they take minutes to hours). Every other command must be one of
KNOWN, with the test that covers it; a command added to the README that is none of these
fails here."""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLIS = ("kto-precompute", "kto-train", "kto-plot")

# Commands the README shows that this file does not run, each with what tests it.
KNOWN = {
    "make venv": "the first step of `make test` (.ci/run); checked: a Makefile target",
    "source .venv/bin/activate": "the venv `make venv` creates",
    "make test": ".ci/run runs it in CI",
    "make demo": "train.demo's pipeline; tests/test_learning.py::test_tiny_demo_runs_end_to_end"
                 " runs it on the tiny model (the real model needs a download)",
    "make demo-tiny": "tests/test_learning.py::test_tiny_demo_runs_end_to_end",
    "make learning-check": "runs tests/test_real_model.py (marked real_model)",
    "pip install torch==2.13.0": "a step of `make venv`; checked: in the Makefile's recipe",
    "pip install -c constraints/cpu.txt -e '.[cpu,test]'": "a step of `make venv`; checked",
    "pip uninstall --yes torchvision torchaudio torchcodec": "a step of `make venv`; checked",
    "pip install -e '.[gpu]'": "checked: the extra exists in pyproject.toml",
    "pip install -e .": "the plain package",
}


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's bash code blocks, continuation lines joined and
    comments dropped, each normalized with shlex (quotes kept where needed)."""
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(shlex.join(words))
    return out


def test_readme_commands_are_extracted_with_their_continuations():
    text = "x\n```bash\nkto-train --a 1 \\\n    --b 2   # note\n\n# only a comment\n```\n"
    assert readme_commands(text) == ["kto-train --a 1 --b 2"]


def classify(command: str) -> str:
    words = shlex.split(command)
    if words[0] in CLIS or words[:2] == ["accelerate", "launch"]:
        return "run"
    if words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
        return "benchmark"
    return "known"


def test_every_readme_command_is_run_parsed_or_known():
    unknown = [c for c in readme_commands(README.read_text(encoding="utf-8"))
               if classify(c) == "known" and c not in KNOWN]
    assert not unknown, f"README commands no test covers (add a test, or KNOWN): {unknown}"


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][a-z-]*):", text, re.M))


def test_known_commands_are_what_they_claim():
    """The make targets exist; the README's pip steps are the Makefile's venv recipe; the
    extras it names exist."""
    shown = [c for c in readme_commands(README.read_text(encoding="utf-8"))
             if classify(c) == "known"]
    recipe = [re.sub(r"\s+(--quiet|\|\| true)", "", line.strip().removeprefix("$(BIN)/"))
              for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
              if line.startswith("\t$(BIN)/pip ")]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for command in shown:
        words = shlex.split(command)
        if words[0] == "make":
            assert words[1] in makefile_targets(), command
        if "a step of `make venv`" in KNOWN[command]:
            assert command in recipe, (command, recipe)
        for extra in re.findall(r"\.\[([a-z,-]+)\]", command):
            assert set(extra.split(",")) <= set(extras), command


def script_modules() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    out = {}
    for name in CLIS:
        module, func = scripts[name].split(":")
        assert func == "main", scripts[name]
        out[name] = module
    return out


def test_benchmark_commands_in_the_readme_parse(monkeypatch):
    """Each `python benchmarks/...` command of the README, given to its own script's
    argument parser (stopped right after parsing): no unknown option, no bad value."""

    class Parsed(Exception):
        pass

    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real_parse(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    commands = [c for c in readme_commands(README.read_text(encoding="utf-8"))
                if classify(c) == "benchmark"]
    assert commands
    for command in commands:
        words = [w.replace("$DATA", "DATA") for w in shlex.split(command)]
        monkeypatch.setattr(sys, "argv", words[1:])
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
        with pytest.raises(Parsed):  # SystemExit(2) on a bad command line
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")


def json_blocks() -> list[str]:
    return re.findall(r"^```json\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def example_record() -> dict:
    """The README's example line of train.jsonl (the first JSON block; the second is the
    vision example)."""
    blocks = json_blocks()
    assert len(blocks) == 2
    return json.loads(blocks[0])


def test_readme_vision_example_is_a_record_with_one_image(tmp_path):
    """The README's image record, with its image beside it, becomes a cache row of the tiny
    LLaVA whose prompt holds the image's 16 tokens."""
    from conftest import build_cache, read_cache
    from tiny_vision import random_image, save_tiny_llava

    record = json.loads(json_blocks()[1])
    (tmp_path / "mllm_demo_data").mkdir()
    random_image(0).save(tmp_path / "mllm_demo_data" / "1.jpg")
    rows = [record, {**record, "label": False, "messages": [
        *record["messages"][:-1], {"role": "assistant", "content": "No idea."}]}]
    data = tmp_path / "vision.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = save_tiny_llava(tmp_path / "llava")
    build_cache(model, [data], tmp_path / "cache")
    _, table = read_cache(tmp_path / "cache")
    assert table["image_tokens"].to_pylist() == [[16], [16]]


def write_data(path: Path, n_prompts: int, offset: int) -> None:
    """``n_prompts`` prompts with a polite (desirable) and a rude (undesirable) reply, in
    the shape of the README's example record."""
    shape = example_record()
    rows = []
    for i in range(offset, offset + n_prompts):
        prompt = [{"role": "user", "content": f"Where is my order {1000 + i}?"}]
        for label, reply in ((True, f"I'm sorry for the wait! Order {1000 + i} ships today."),
                             (False, "Not my problem.")):
            rows.append({"prompt": prompt,
                         "completion": [{"role": "assistant", "content": reply}],
                         "label": label})
    assert all(r.keys() == shape.keys() for r in rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def argv_of(command: str, tiny_dir: Path) -> list[str]:
    """The README command as this test runs it: MODEL -> the tiny model, a console script
    -> python -m its module, "$(which kto-train)" -> the installed script."""
    words = [str(tiny_dir) if w == "MODEL" else w for w in shlex.split(command)]
    bindir = Path(sys.executable).parent
    if words[0] in CLIS:
        return [sys.executable, "-m", script_modules()[words[0]], *words[1:]]
    assert words[:2] == ["accelerate", "launch"], command
    script = shutil.which("kto-train", path=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert script, "kto-train is not installed (pip install -e .)"
    return [str(bindir / "accelerate"),
            *[script if w == "$(which kto-train)" else w for w in words[1:]]]


def test_readme_train_on_your_own_data_runs_on_the_tiny_model(tiny_dir, tmp_path):
    commands = [c for c in readme_commands(README.read_text(encoding="utf-8"))
                if classify(c) == "run"]
    names = [shlex.split(c)[0] for c in commands]
    assert {"kto-precompute", "kto-train", "kto-plot", "accelerate"} <= set(names)
    write_data(tmp_path / "train.jsonl", 16, 0)  # 32 rows: a global batch of 2 x 8
    write_data(tmp_path / "eval.jsonl", 4, 100)  # 8 rows: one eval batch
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for command in commands:
        proc = subprocess.run(argv_of(command, tiny_dir), cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, (command, proc.stderr[-3000:])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("eval_loss" in m for m in metrics)
    assert metrics[-1]["step"] == 12  # 32 rows / batch 8 x 3 epochs
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run-2gpu" / "model.safetensors").is_file()


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_readme_and_docs_resolve():
    """Every relative link of README.md, CHANGELOG.md and docs/*.md names a file that
    exists and, with #anchor, a heading of that file."""
    pages = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 9
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, frag = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif frag and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(encoding="utf-8"), re.M)
                if frag not in {anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target}")
    assert not broken, broken
