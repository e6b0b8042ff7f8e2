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


def test_kto_train_help_lists_trl_named_options():
    from click.testing import CliRunner

    from train.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--beta", "--loss-type", "--desirable-weight", "--undesirable-weight",
                   "--ftx-gamma", "--per-device-train-batch-size",
                   "--gradient-accumulation-steps", "--resume-from-checkpoint", "--lora-r"):
        assert option in result.output
