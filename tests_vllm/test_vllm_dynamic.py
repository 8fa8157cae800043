"""headgain's dynamic vLLM plugin on vLLM's CPU build (its own venv: `make test-vllm`).

The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the worker's
`headgain.vllm.Attachment` is read directly. The reference is ``transformers`` with eager
attention and `headgain.attach`: S_v there is read from the attention probabilities the
model returns, here it is recomputed from vLLM's packed queries and keys.
"""

import contextlib
import copy
import json
import os
import platform
import re
import subprocess
import sys
import warnings

import pytest
import torch
import transformers as tf

import headgain

pytest.importorskip("vllm", reason="vLLM is installed in its own venv: make test-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process

from conftest import ENTRY_POINT, ENTRY_POINT_ROOT, generate, start_engine, step_records  # noqa: E402
from vllm import LLM  # noqa: E402

import headgain.vllm as hv  # noqa: E402
from headgain.testing.checkpoints import qwen2_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 32
VISUAL = 20  # the token id the arch map calls visual (a text-only decoder has none of its own)
ARCH = headgain.ArchMap("model.layers.*.self_attn", visual_token_ids=(VISUAL,))
PROMPTS = [[1] + [VISUAL] * 8 + [30, 31, 32], [1, 40, VISUAL, VISUAL, VISUAL, 41, 42], [1, 50, 51, VISUAL, 52]]
NEW = 6
CFG = {"l_perc": 1, "tau_perc": 0.3, "g_perc": 2.0, "l_reas": 2, "tau_reas": 0.2, "g_reas": 2.5}
OTHER = {"l_perc": 0, "tau_perc": 0.1, "g_perc": 1.8, "l_reas": 3, "tau_reas": 0.05, "g_reas": 1.5}
UNIT = {**CFG, "g_perc": 1.0, "g_reas": 1.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    qwen2_checkpoint(path, LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    return path


@pytest.fixture(scope="module")
def vanilla(checkpoint):
    return start_engine(checkpoint, {hv.ENV_ENABLE: "0"})


@pytest.fixture(scope="module")
def served(checkpoint):
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "64", hv.ENV_ARCH_MAP: ARCH.to_json()}
    return start_engine(checkpoint, env)


@pytest.fixture(scope="module")
def copying(checkpoint):
    """The plugin reading earlier keys from its own copy, never from vLLM's cache."""
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "64", hv.ENV_ARCH_MAP: ARCH.to_json(), hv.ENV_KEYS: "copy"}
    return start_engine(checkpoint, env)


@pytest.fixture(scope="module")
def compiled(checkpoint):
    """The plugin in vLLM's compiled mode (torch.compile; vLLM's CPU build runs no CUDA graphs)."""
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "8", hv.ENV_ARCH_MAP: ARCH.to_json()}
    llm = start_engine(checkpoint, env, enforce_eager=False)
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0, "the engine must compile the model"
    return llm


@pytest.fixture(scope="module")
def chunked(checkpoint):
    """The plugin on an engine that splits prompts: chunked prefill with 8 tokens per step (an
    engine of the module's lifetime: vLLM's shutdown of one engine tears down the process-wide
    parallel groups the others use)."""
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "8", hv.ENV_ARCH_MAP: ARCH.to_json()}
    return start_engine(checkpoint, env, enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=2)


@pytest.fixture(scope="module")
def cached(checkpoint):
    """The plugin on an engine with prefix caching, blocks of 32 tokens."""
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "8", hv.ENV_ARCH_MAP: ARCH.to_json()}
    # one sequence at a time: the completions of an n = 2 request run one after the other
    return start_engine(checkpoint, env, enable_prefix_caching=True, block_size=32, max_num_seqs=1)


@pytest.fixture(scope="module")
def preempting(checkpoint):
    """The plugin on an engine whose KV cache (6 blocks of 32 tokens) holds four 20-token
    prompts but not their growth: vLLM preempts requests and computes them again later."""
    env = {hv.ENV_ENABLE: "1", hv.ENV_RECORD: "8", hv.ENV_ARCH_MAP: ARCH.to_json()}
    return start_engine(checkpoint, env, block_size=32, num_gpu_blocks_override=6, max_model_len=96, max_num_seqs=4)


def _generate(llm: LLM, prompts, configs):
    """`generate` of token-id prompts, `NEW` tokens each."""
    return generate(llm, [{"prompt_token_ids": p} for p in prompts], configs, NEW)


def _transformers(model, prompt, cfg, passes=None):
    """Greedy tokens, and S_v and gains of every pass, from transformers (eager attention) with
    headgain. ``passes``: vLLM's steps of one request, (tokens computed before, tokens computed)
    each, replayed through the cache (0 before: a fresh cache, over the tokens so far); default:
    the prompt in one pass, then `NEW` - 1 decoding steps."""
    passes = passes or [(0, len(prompt))] + [(len(prompt) + i, 1) for i in range(NEW - 1)]
    tokens, ratios, gains, cache = list(prompt), [], [], None
    with headgain.attach(model, ARCH, cfg) as handle, torch.no_grad():
        for past, n in passes:
            if past == 0:
                cache = tf.DynamicCache(config=model.config)
            ids = torch.tensor([tokens[past : past + n]])
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            ratios.append(handle.last_ratios[:, 0])
            gains.append(handle.last_gains[:, 0])
            if past + n == len(tokens):  # a pass up to the last token: its last row gives the next one
                tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :], ratios, gains


def _check_steps(steps, ratios, gains) -> None:
    """The plugin's records of one request against `_transformers`' S_v and gains, pass by pass."""
    assert len(steps) == len(ratios)
    for (_, _, r, g), ref_r, ref_g in zip(steps, ratios, gains):
        assert r.shape == (LAYERS, HEADS)
        torch.testing.assert_close(r, ref_r, atol=2e-6, rtol=0)
        assert torch.equal(g, ref_g)


def test_setup_declares_the_entry_point_vllm_loaded():
    with open(os.path.join(HERE, "..", "setup.py")) as f:
        assert f'"vllm.general_plugins": ["{ENTRY_POINT}"]' in f.read()


@pytest.mark.parametrize("keys", ["auto", "copy"])
def test_sv_gains_and_tokens_match_transformers(checkpoint, served, copying, vanilla, keys):
    """Earlier keys read from vLLM's paged cache (auto: where headgain knows its layout, as on
    x86 CPUs) or from headgain's own copy: the same S_v, gains and tokens as transformers."""
    # the plugin was loaded by vLLM through the entry point (nothing here called register)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert getattr(GPUModelRunner.execute_model, "_headgain_wrapped", False)
    served = served if keys == "auto" else copying
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, _, ids = _generate(served, PROMPTS, [CFG] * len(PROMPTS))
    # every prompt holds the visual token: no request is reported without one
    assert not [w for w in caught if "found no visual tokens" in str(w.message)]
    (source,) = served.apply_model(lambda model: hv.attachment_of(model).key_source)
    if keys == "copy":
        assert source == "copy"
    elif platform.machine() == "x86_64":  # vLLM's portable CPU kernels store keys in the layout "cpu"
        assert source == "paged cpu"
    plain, _, _ = _generate(vanilla, PROMPTS, [...] * len(PROMPTS))
    assert tokens != plain, "the config must change the greedy tokens, or the comparison shows nothing"
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    for prompt, got, request_id in zip(PROMPTS, tokens, ids):
        want, ratios, gains = _transformers(model.eval(), prompt, CFG)
        assert got == want
        steps = step_records(served, request_id)
        assert [(past, n) for past, n, _, _ in steps] == [(0, len(prompt))] + [
            (len(prompt) + i, 1) for i in range(NEW - 1)
        ]
        _check_steps(steps, ratios, gains)
        assert any(bool((g != 1).any()) for _, _, _, g in steps)


def test_compiled_graphs_run_headgain_at_every_step(checkpoint, compiled):
    """headgain's op sits in the graphs vLLM compiles (attached when the model loads, before
    torch.compile traces it): S_v, gains and tokens as transformers; a request without a
    config keeps transformers' vanilla tokens."""
    tokens, _, ids = _generate(compiled, PROMPTS[:2], [CFG, ...])
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    want, ratios, gains = _transformers(model.eval(), PROMPTS[0], CFG)
    assert tokens[0] == want
    _check_steps(step_records(compiled, ids[0]), ratios, gains)
    assert tokens[1] == _transformers(model, PROMPTS[1], UNIT)[0]


@pytest.mark.parametrize("query", ["last", "mean_text"])  # i* alone (read in the cache in place); several rows
def test_chunked_prefill_matches_transformers_fed_the_same_chunks(checkpoint, chunked, query):
    """With chunked prefill each chunk is a pass of its own (i*: its last token), as in
    transformers when the prompt goes through the cache in the same pieces."""
    long_prompt = [1, 41, 42, 43, 44] + [VISUAL] * 8 + [30, 31, 32, 33, 34, 35]  # 19 tokens
    prompts = [long_prompt, PROMPTS[1]]
    llm, cfg = chunked, {**CFG, "query": query}
    # the engine warns once
    with pytest.warns(RuntimeWarning, match="in chunks") if query == "last" else contextlib.nullcontext():
        tokens, _, ids = _generate(llm, prompts, [cfg] * len(prompts))
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    for prompt, got, request_id in zip(prompts, tokens, ids):
        steps = step_records(llm, request_id)
        passes = [(past, n) for past, n, _, _ in steps]
        assert sum(n for past, n in passes if past < len(prompt)) == len(prompt)
        want, ratios, gains = _transformers(model.eval(), prompt, cfg, passes)
        assert got == want
        _check_steps(steps, ratios, gains)
    first = [n for past, n, _, _ in step_records(llm, ids[0]) if past < len(long_prompt)]
    assert len(first) >= 3, f"the 19-token prompt must be split by the 8-token budget, got chunks {first}"
    if query == "last":
        assert tokens[0] != _transformers(model, long_prompt, UNIT)[0], "the config must change the greedy tokens"


def _cached_tokens(llm: LLM, prompt: list[int], cfg, n: int = 1) -> tuple[list[int], int, str]:
    """(greedy tokens, prompt tokens vLLM took from its prefix cache, request id) of one request
    (of n completions: the tokens of each)."""
    from vllm import SamplingParams

    extra = None if cfg is ... else {hv.REQUEST_KEY: cfg}
    # greedy: top_k 1 (vLLM takes n > 1 only with a temperature)
    params = SamplingParams(n=n, max_tokens=NEW, min_tokens=NEW, temperature=1.0, top_k=1, extra_args=extra)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    tokens = [list(c.token_ids) for c in out.outputs]
    return tokens[0] if n == 1 else tokens, out.num_cached_tokens, out.request_id


def test_preempted_request_is_computed_again_as_one_pass(checkpoint, preempting):
    """A preempted request's recomputation (prompt and output so far) is a new pass, i* at its
    last token, as transformers fed the same tokens afresh; the engine keeps serving."""
    prompts = [[1, 41 + i] + [VISUAL] * 8 + list(range(60 + 3 * i, 70 + 3 * i)) for i in range(4)]
    new = 60
    with pytest.warns(RuntimeWarning, match="preempted"):
        tokens, _, ids = generate(preempting, [{"prompt_token_ids": p} for p in prompts], [CFG] * 4, new)
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    recomputed = 0
    for prompt, got, request_id in zip(prompts, tokens, ids):
        steps = step_records(preempting, request_id)
        passes = [(past, n) for past, n, _, _ in steps]
        recomputed += sum(past == 0 for past, _ in passes[1:])
        want, ratios, gains = _transformers(model.eval(), prompt, CFG, passes)
        assert len(got) == new and got == want
        _check_steps(steps, ratios, gains)
    assert recomputed, "the cache was meant to be too small for the four requests: nothing was preempted"


def test_prefix_cache_serves_vanilla_requests_never_configured_ones(checkpoint, cached, vanilla):
    """Requests with a config read no cached blocks and share none of theirs; vanilla ones keep
    the prefix cache."""
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    first = [1, 41, 42] + [VISUAL] * 8 + list(range(60, 90))  # 41 tokens: one full block of 32
    second = [1, 43, 44] + [VISUAL] * 8 + list(range(100, 130))
    plain = _generate(vanilla, [first, second], [..., ...])[0]
    assert _cached_tokens(cached, first, ...)[:2] == (plain[0], 0)
    assert _cached_tokens(cached, first, ...)[:2] == (plain[0], 32)  # vanilla requests hit the cache
    # a configured request after vanilla ones with the same prompt: nothing read from the cache
    tokens, hits, request_id = _cached_tokens(cached, first, CFG)
    want, ratios, gains = _transformers(model.eval(), first, CFG)
    assert (tokens, hits) == (want, 0) and tokens != plain[0]
    steps = step_records(cached, request_id)
    assert [(past, n) for past, n, _, _ in steps][0] == (0, len(first))
    _check_steps(steps, ratios, gains)
    # a vanilla request after a configured one: the blocks it computed under its gains serve nobody
    assert _cached_tokens(cached, second, CFG)[:2] == (_transformers(model, second, CFG)[0], 0)
    assert _cached_tokens(cached, second, ...)[:2] == (plain[1], 0)
    # two completions of one configured request share its salt: the second, run after the first
    # has filled the cache, reads none of it either
    third = [1, 45] + [VISUAL] * 8 + list(range(140, 172))
    assert _cached_tokens(cached, third, CFG, n=2)[0] == [_transformers(model, third, CFG)[0]] * 2


def test_unit_gains_give_vanillas_tokens_and_logprobs(served, vanilla):
    assert _generate(served, PROMPTS, [UNIT] * len(PROMPTS))[:2] == _generate(vanilla, PROMPTS, [...] * 3)[:2]


@pytest.mark.parametrize("max_runs", [8, 1], ids=["in-place-runs", "gathered-rows"])
def test_batch_with_different_configs(served, vanilla, monkeypatch, max_runs):
    """Requests with and without a config interleaved (their rows in three runs of the packed
    batch): scaled in place run by run, or (more runs than the limit) through one copy of
    their rows; either way each request's tokens are those it gets alone."""
    from headgain.vllm import attachment

    monkeypatch.setattr(attachment, "_MAX_RUNS", max_runs)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    # OTHER as the JSON string vLLM's HTTP API carries; "off" as False
    configs = [CFG, ..., json.dumps(OTHER), "off", {"l_perc": 3, "l_reas": 3}]
    tokens, logprobs, _ = _generate(served, prompts, configs)
    plain_tokens, plain_logprobs, _ = _generate(vanilla, prompts, [...] * len(prompts))
    alone, _, _ = _generate(served, [PROMPTS[0], PROMPTS[1]], [CFG, OTHER])
    for i in (1, 3):  # without a config (or switched off): bit-identical to vanilla
        assert tokens[i] == plain_tokens[i] and logprobs[i] == plain_logprobs[i]
    assert [tokens[0], tokens[2]] == alone  # a request's result does not depend on its batch
    assert tokens[0] != plain_tokens[0] and tokens[2] != plain_tokens[2]


def test_requests_are_checked_at_submission(served, vanilla):
    with pytest.raises(ValueError, match=re.escape(f"{hv.ENV_ENABLE}=1")):
        _generate(vanilla, PROMPTS[:1], [CFG])
    with pytest.raises(ValueError, match="l_perc=9 outside the model"):
        _generate(served, PROMPTS[:1], [{**CFG, "l_perc": 9}])
    with pytest.raises(ValueError, match="unknown preset"):
        _generate(served, PROMPTS[:1], ["no-such-preset"])
    assert _generate(served, PROMPTS[:1], [CFG])[0]  # the engine still serves


def test_unsupported_engine_is_refused_at_start(checkpoint):
    env = {hv.ENV_ENABLE: "1", hv.ENV_ARCH_MAP: json.dumps(ARCH.to_dict())}
    with pytest.raises(Exception) as info:
        start_engine(checkpoint, env, pipeline_parallel_size=2)
    assert "pipeline_parallel_size=1" in "".join(str(e) for e in _chain(info.value))


def test_engine_checks_name_every_setting_to_change(served):
    """`check_engine` on a real engine's config with what vLLM's CPU build cannot start here
    (CUDA graphs: it turns them off)."""
    from vllm.config import CUDAGraphMode

    config = copy.deepcopy(served.llm_engine.vllm_config)
    hv.check_engine(config)  # the engine as it runs
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    with pytest.raises(headgain.HeadGainError, match='"cudagraph_mode": "NONE"'):
        hv.check_engine(config)


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tensor_parallel_ranks_in_server_processes(checkpoint, tmp_path, mode):
    """Engine core and two tensor-parallel workers in processes of their own, the plugin loaded
    there through its entry point and enabled by an engine-wide default config: each rank reads
    and scales its own heads at its slice of the row-parallel o_proj (in eager mode, and from
    the op in each rank's compiled graphs), and together they match transformers. A request
    that switches headgain off stays vanilla."""
    spec = {"prompts": PROMPTS[:2], "configs": [None, "off"], "new_tokens": NEW}  # None: the engine's default
    (tmp_path / "requests.json").write_text(json.dumps(spec))
    cores = sorted(os.sched_getaffinity(0))
    # one core per rank: vLLM's automatic binding wants a NUMA node per rank
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND=f"{cores[0]}|{cores[-1]}")
    env.pop(hv.ENV_ENABLE, None)
    env.update({hv.ENV_CONFIG: json.dumps(CFG), hv.ENV_RECORD: "8", hv.ENV_ARCH_MAP: ARCH.to_json()})
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), ENTRY_POINT_ROOT])
    out = tmp_path / "out.json"
    script = os.path.join(HERE, "serve_dynamic.py")
    command = [sys.executable, script, checkpoint, str(tmp_path / "requests.json"), "2", str(out), mode]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
    want, ratios, gains = _transformers(model.eval(), PROMPTS[0], CFG)
    assert got["tokens"][0] == want
    assert len(got["ratios"][0]) == NEW
    for r, g, ref_r, ref_g in zip(got["ratios"][0], got["gains"][0], ratios, gains):
        torch.testing.assert_close(torch.tensor(r), ref_r, atol=1e-5, rtol=0)
        assert torch.equal(torch.tensor(g), ref_g)
    assert got["ratios"][1] is None and got["tokens"][1] == _transformers(model, PROMPTS[1], UNIT)[0]
