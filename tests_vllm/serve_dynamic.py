"""Greedy tokens and headgain's per-step records from vLLM with the dynamic plugin, run the
way a server runs it: engine core and workers in their own processes, the plugin loaded
there through its entry point (run as a script: vLLM's processes need a ``__main__`` guard).

    python tests_vllm/serve_dynamic.py CHECKPOINT REQUESTS.json TENSOR_PARALLEL OUT.json [compiled]

REQUESTS.json: {"prompts": [[ids]], "configs": [config or null], "new_tokens": N}, null:
no headgain field. The plugin's settings come from the environment (HEADGAIN_VLLM,
HEADGAIN_CONFIG, HEADGAIN_ARCH_MAP, HEADGAIN_RECORD). OUT.json: {"tokens": [[ids]],
"ratios": [[(L, H) per step] or null], "gains": ...} with the heads of all tensor-parallel
ranks side by side (null: a request served without headgain). ``compiled``: vLLM's compiled
mode (torch.compile) instead of eager.
"""

import json
import os
import sys


def main() -> None:
    checkpoint, requests_file, tensor_parallel, out_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    mode = sys.argv[5] if len(sys.argv) > 5 else "eager"
    if mode not in ("eager", "compiled"):
        sys.exit(f"the mode is 'eager' or 'compiled', got {mode!r}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM reserves far more by default
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends _records to the workers
    import torch
    from vllm import LLM, SamplingParams

    from headgain.vllm import records_of

    with open(requests_file) as f:
        spec = json.load(f)
    from conftest import ENGINE_ARGS  # this script's folder: the tests' engine settings

    engine = {**ENGINE_ARGS, "tensor_parallel_size": tensor_parallel, "max_num_seqs": 4}
    llm = LLM(checkpoint, **{**engine, "enforce_eager": mode == "eager"})
    compilation = llm.llm_engine.vllm_config.compilation_config.mode
    if (compilation != 0) != (mode == "compiled"):
        sys.exit(f"asked for {mode} mode, the engine runs compilation mode {compilation}")
    new = spec["new_tokens"]
    params = [
        SamplingParams(
            max_tokens=new, min_tokens=new, temperature=0.0, extra_args=None if c is None else {"headgain": c}
        )
        for c in spec["configs"]
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    ranks = sorted(llm.apply_model(records_of), key=lambda r: r[0])  # one (first head, records) per rank
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "ratios": [], "gains": []}
    for o in outputs:
        per_rank = [[v for k, v in steps.items() if k.startswith(o.request_id + "-")] for _, steps in ranks]
        if not all(per_rank):  # a request served without headgain: nothing recorded
            result["ratios"].append(None)
            result["gains"].append(None)
            continue
        per_rank = [found for (found,) in per_rank]
        for what in ("ratios", "gains"):  # per step (L, H): the ranks' heads side by side
            steps = zip(*[[torch.tensor(step[what]) for step in rank] for rank in per_rank])
            result[what].append([torch.cat(parts, dim=1).tolist() for parts in steps])
    with open(out_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
