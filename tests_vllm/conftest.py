"""Shared setup of the vLLM tests: headgain's ``vllm.general_plugins`` entry point, as an
installed headgain declares it (this venv imports headgain from the checkout, so the
entry point is written here as a distribution's metadata on ``sys.path``)."""

import os
import sys
import tempfile

ENTRY_POINT = "headgain = headgain.vllm:register"  # as setup.py declares it


def _declare_entry_point() -> str:
    """The folder (added to ``sys.path``) that holds the entry point's metadata."""
    root = tempfile.mkdtemp(prefix="headgain-entry-point-")
    info = os.path.join(root, "headgain-0.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: headgain\nVersion: 0.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write(f"[vllm.general_plugins]\n{ENTRY_POINT}\n")
    sys.path.append(root)
    return root


ENTRY_POINT_ROOT = _declare_entry_point()  # for PYTHONPATH of the vLLM processes tests start

# the engine settings headgain's plugin serves, small enough for a CPU test; chunked prefill
# off: every prompt in one pass (the paper's prefill), as the transformers references run it
ENGINE_ARGS = dict(
    dtype="float32",
    enforce_eager=True,
    enable_prefix_caching=False,
    enable_chunked_prefill=False,
    max_model_len=128,
    max_num_seqs=8,
    seed=0,
)


def start_engine(checkpoint: str, env: dict, **overrides):
    """A ``vllm.LLM`` of ``checkpoint`` (`ENGINE_ARGS` updated by ``overrides``) started with
    ``env`` set (the plugin reads it when the model loads), the environment restored after."""
    from vllm import LLM

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return LLM(checkpoint, **{**ENGINE_ARGS, **overrides})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def generate(llm, prompts: list, configs: list, new_tokens: int):
    """(tokens, logprobs of the chosen tokens, request ids) of greedy generation of exactly
    ``new_tokens`` tokens; ``prompts``: vLLM prompts (dicts), ``configs``: one per-request
    headgain value per prompt (``...``: no headgain field)."""
    from vllm import SamplingParams

    from headgain.vllm import REQUEST_KEY

    params = [
        SamplingParams(
            max_tokens=new_tokens,
            min_tokens=new_tokens,
            temperature=0.0,
            logprobs=0,
            extra_args=None if cfg is ... else {REQUEST_KEY: cfg},
        )
        for cfg in configs
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs]
    return tokens, logprobs, [o.request_id for o in outputs]


def step_records(llm, request_id: str) -> list:
    """The worker's per-step records of one request as (past, tokens, ratios, gains) tuples
    (engine ids extend the front end's); the engine runs in this process."""
    from headgain.vllm import attachment_of

    def read(model):
        records = attachment_of(model).records
        (key,) = [k for k in records if k == request_id or k.startswith(request_id + "-")]
        return [(s.past, s.tokens, s.ratios, s.gains) for s in records[key]]

    (found,) = llm.apply_model(read)
    return found
