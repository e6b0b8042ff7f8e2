"""Runs in its own process (vLLM spawns workers and changes process state): start ONE
real vLLM engine on the tiny model, score synthetic pairs, then build the caches of
both real demo files with it.

usage: python vllm_driver.py MODEL_DIR OUT_DIR"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(model_dir: str, out: Path) -> None:
    from conftest import DPO_DEMO, KTO_DEMO, REAL_OPTS, build_cache
    from test_scoring import random_pairs

    from precompute.scoring.vllm_backend import VLLMScorer

    pairs = random_pairs(1024, 40, seed=0)
    scorer = VLLMScorer(model_dir, "float32", max_model_len=1025, tensor_parallel_size=1,
                        gpu_memory_utilization=0.9, cpu_kv_cache_gib=1, seed=0)
    try:
        scores = scorer.score(pairs).tolist()
        for name, path in (("kto", KTO_DEMO), ("dpo", DPO_DEMO)):
            build_cache(model_dir, [path], out / name, backend="vllm", scorer=scorer,
                        **REAL_OPTS)
    finally:
        scorer.close()
    (out / "synthetic.json").write_text(json.dumps({"pairs": pairs, "scores": scores}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
