from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402

# Real public data (LLaMA-Factory's demo files) for the tests marked `real_data`: the
# folder named by KTO_TEST_DATA, else ../shared/data beside the checkout. Absent, those
# tests are skipped; with KTO_REQUIRE_TEST_DATA=1 (CI, .ci/run) they fail instead.
TEST_DATA = Path(os.environ.get("KTO_TEST_DATA")
                 or Path(__file__).resolve().parents[2] / "shared" / "data")
KTO_DEMO = TEST_DATA / "kto_en_demo.json"
DPO_DEMO = TEST_DATA / "dpo_en_demo.json"
MLLM_DEMO = TEST_DATA / "mllm_demo.json"  # with its images in mllm_demo_data/
REAL_FILES = (KTO_DEMO, DPO_DEMO, MLLM_DEMO)


def missing_test_data() -> str | None:
    """One line saying which real data files are missing and how to get them, or None."""
    missing = [p.name for p in REAL_FILES if not p.is_file()]
    if not missing:
        return None
    return (f"real test data not found: {', '.join(missing)} in {TEST_DATA}; get the files "
            "from the data/ folder of https://github.com/hiyouga/LLaMA-Factory and set "
            "KTO_TEST_DATA to that folder")


def need_test_data() -> None:
    """Skip the calling test (fail it under KTO_REQUIRE_TEST_DATA=1) without the files."""
    reason = missing_test_data()
    if reason is None:
        return
    if os.environ.get("KTO_REQUIRE_TEST_DATA") == "1":
        pytest.fail(f"{reason} (KTO_REQUIRE_TEST_DATA=1)", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item) -> None:
    """Before any fixture: one skip location, so pytest -ra reports all of them in one line."""
    if (item.get_closest_marker("real_data") is not None
            or "hf_real_caches" in getattr(item, "fixturenames", ())):
        need_test_data()


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
    need_test_data()
    root = tmp_path_factory.mktemp("hf-real")
    for name, path in (("kto", KTO_DEMO), ("dpo", DPO_DEMO)):
        build_cache(tiny_dir, [path], root / name, **REAL_OPTS)
    return root
