"""Per-token completion log-probs from the real vLLM engine, as kto-precompute's vLLM
scorer asks for them (token-id prompts, ``prompt_logprobs=0``); run in its own process
by benchmarks/backends.py (vLLM spawns workers and changes process state).

    python benchmarks/vllm_tokens.py MODEL DTYPE PAIRS.json OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model: str, dtype: str, pairs_path: Path, out: Path) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from precompute.scoring.vllm_backend import VLLMScorer

    pairs = json.loads(pairs_path.read_text())
    longest = max(len(p) + len(c) for p, c in pairs)
    scorer = VLLMScorer(model, dtype, max_model_len=longest + 1, tensor_parallel_size=1,
                        gpu_memory_utilization=0.9, cpu_kv_cache_gib=1, seed=0)
    try:
        outputs = scorer.llm.generate(
            [TokensPrompt(prompt_token_ids=[*p, *c]) for p, c in pairs],
            SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        tokens = []
        for o, (p, c) in zip(outputs, pairs, strict=True):
            entries = o.prompt_logprobs[len(p):]
            tokens.append([e[t].logprob for e, t in zip(entries, c, strict=True)])
    finally:
        scorer.close()
    out.write_text(json.dumps(tokens))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
