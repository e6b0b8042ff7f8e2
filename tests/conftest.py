from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import SHARED_DATA, save_tiny  # noqa: E402

KTO_DEMO = SHARED_DATA / "kto_en_demo.json"
DPO_DEMO = SHARED_DATA / "dpo_en_demo.json"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def model(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


# Options for the real-data caches the tests build with both backends (shorter than the
# default 1024 to keep CI quick; every record still goes through).
REAL_OPTS = {"max_length": 512, "max_prompt_length": 256, "shard_size": 128}


def build_cache(tiny_dir, data, output, backend="hf", scorer=None, **kw):
    from precompute.config import PrecomputeConfig
    from precompute.run import run
    from shared.tokenization import TokenizeOptions

    tok = TokenizeOptions(kw.pop("max_length", 1024), kw.pop("max_prompt_length", None),
                          kw.pop("truncation_mode", "keep_end"))
    config = PrecomputeConfig(model=str(tiny_dir), data=tuple(str(d) for d in data),
                              output=str(output), backend=backend, tokenize=tok, **kw)
    return run(config, scorer=scorer)


def read_cache(directory):
    """(manifest, table) through the public reader: checksums verified, memory-mapped."""
    from shared.dataset import open_cache

    cache = open_cache(directory)
    return cache.manifest, cache.table


@pytest.fixture(scope="session")
def hf_real_caches(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-real")
    for name, path in (("kto", KTO_DEMO), ("dpo", DPO_DEMO)):
        build_cache(tiny_dir, [path], root / name, **REAL_OPTS)
    return root
