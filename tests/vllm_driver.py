"""Runs in its own process (vLLM spawns workers and changes process state): start ONE
real vLLM engine on the tiny model, score synthetic pairs, then build the caches of
both real demo files with it (where they are present, see conftest.TEST_DATA).

usage: python vllm_driver.py MODEL_DIR OUT_DIR"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(model_dir: str, out: Path) -> None:
    from conftest import DPO_DEMO, KTO_DEMO, REAL_OPTS, build_cache, missing_test_data
    from test_scoring import random_pairs

    from precompute.scoring.vllm_backend import VLLMScorer

    pairs = random_pairs(1024, 40, seed=0)
    scorer = VLLMScorer(model_dir, "float32", max_model_len=1025, tensor_parallel_size=1,
                        gpu_memory_utilization=0.9, cpu_kv_cache_gib=1, seed=0)
    try:
        scores = scorer.score(pairs).tolist()
        flat = flat_path_taken(scorer, pairs[0])
        for name, path in (("kto", KTO_DEMO), ("dpo", DPO_DEMO)):
            if missing_test_data() is not None:
                break  # the real-file tests skip (or fail) on their own
            build_cache(model_dir, [path], out / name, backend="vllm", scorer=scorer,
                        **REAL_OPTS)
    finally:
        scorer.close()
    (out / "synthetic.json").write_text(json.dumps({"pairs": pairs, "scores": scores,
                                                    "flat_offered": scorer.flat,
                                                    "flat_taken": flat}))


def flat_path_taken(scorer, pair) -> bool:
    """Whether vLLM returned FlatLogprobs that the scorer summed as one slice."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from precompute.scoring.vllm_backend import sum_flat_logprobs

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                            flat_logprobs=True)
    out = scorer.llm.generate([TokensPrompt(prompt_token_ids=[*pair[0], *pair[1]])], params,
                              use_tqdm=False)[0]
    entries = out.prompt_logprobs
    return (hasattr(entries, "start_indices")
            and sum_flat_logprobs(entries, len(pair[0]), pair[1]) is not None)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
