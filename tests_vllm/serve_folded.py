"""Greedy tokens from unmodified vLLM for a saved checkpoint (run as a script: vLLM starts
its engine in a separate process, which needs a ``__main__`` guard).

    python tests_vllm/serve_folded.py CHECKPOINT PROMPTS.json NEW_TOKENS OUT.json
"""

import json
import os
import sys


def main() -> None:
    checkpoint, prompts_file, new_tokens, out_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM reserves far more by default
    from vllm import LLM, SamplingParams

    with open(prompts_file) as f:
        prompts = json.load(f)
    llm = LLM(checkpoint, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    with open(out_file, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":
    main()
