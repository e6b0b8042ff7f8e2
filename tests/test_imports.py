"""Every module imports (catches a broken import in code no other test reaches);
train/ and shared/ never import vLLM."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = ("shared", "precompute", "train")


def all_modules():
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield name
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            yield info.name


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_module_imports(module):
    importlib.import_module(module)


def test_train_and_shared_do_not_import_vllm():
    code = ("import sys, shared.cache, shared.formats, shared.readers, shared.tokenization, "
            "shared.kl, shared.logprobs, shared.fingerprint, train.cli; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_kto_train_stub_says_it_is_not_built(capsys):
    from click.testing import CliRunner

    from train.cli import main

    result = CliRunner().invoke(main, ["--model", "x"])
    assert result.exit_code == 1 and "not built yet" in result.output
