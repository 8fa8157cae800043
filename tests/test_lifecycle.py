"""Lifecycle of an attachment: copies, shared configs, checkpointing, threads, leaks, masks."""

import copy
import gc
import io
import subprocess
import sys
import threading
import warnings
import weakref

import pytest
import torch
from support import attach_mixed, token_inputs

import headgain
from headgain import ArchMap
from headgain.testing.tiny import IMAGE_ID, tiny_model

CFG = dict(l_perc=1, l_reas=2, tau_perc=0.3, tau_reas=0.29, g_perc=1.5, g_reas=1.7)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _configs(model):
    """module name -> (its config object, that config's attention backend) for every module with a config."""
    return {
        name: (module.config, module.config._attn_implementation)
        for name, module in model.named_modules()
        if hasattr(module.__dict__.get("config"), "_attn_implementation")
    }


# ---------------------------------------------------------------------- 1. copies
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_carries_its_own_attachment(how, one_thread_quiet):
    model = tiny_model("qwen2_5_vl", "sdpa")
    inputs = token_inputs()
    vanilla = _logits(model, inputs)
    handle = headgain.attach(model, cfg=CFG)
    rescaled = _logits(model, inputs)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    other = headgain.handle_of(twin)
    assert other is not None and other is not handle and other.model is twin and other.cfg == handle.cfg
    assert torch.equal(_logits(twin, inputs), rescaled)
    torch.testing.assert_close(other.last_ratios, handle.last_ratios, rtol=0, atol=0)
    other.detach()
    assert torch.equal(_logits(twin, inputs), vanilla), "the detached copy is vanilla"
    assert torch.equal(_logits(model, inputs), rescaled), "detaching the copy must not touch the original"
    twin2 = copy.deepcopy(model)
    handle.detach()
    assert torch.equal(_logits(model, inputs), vanilla)
    assert torch.equal(_logits(twin2, inputs), rescaled), "detaching the original must not touch a copy"


def test_a_saved_attached_model_runs_in_a_new_process(tmp_path):
    model = tiny_model("llava", "sdpa")
    inputs = token_inputs()
    headgain.attach(model, cfg=CFG)
    expected = _logits(model, inputs)
    torch.save({"model": model, "inputs": inputs, "expected": expected}, tmp_path / "attached.pt")
    script = (
        "import torch, headgain\n"
        f"d = torch.load({str(tmp_path / 'attached.pt')!r}, weights_only=False)\n"
        "with torch.no_grad():\n"
        "    out = d['model'](**d['inputs']).logits\n"
        "assert headgain.handle_of(d['model']) is not None\n"
        "assert torch.equal(out, d['expected']), (out - d['expected']).abs().max()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------------- 2. shared config
@pytest.mark.parametrize("order", ["first-first", "second-first"])
def test_models_sharing_one_config_detach_in_any_order(order):
    first = tiny_model("llava", "sdpa")
    second = type(first)(first.config).eval()
    second.load_state_dict(first.state_dict())
    assert second.config is first.config
    inputs = token_inputs()
    vanilla = _logits(first, inputs)
    handles = [headgain.attach(first, cfg=CFG), headgain.attach(second, cfg=CFG)]
    rescaled = _logits(first, inputs)
    assert torch.equal(_logits(second, inputs), rescaled)
    ordered = handles if order == "first-first" else handles[::-1]
    ordered[0].detach()
    assert torch.equal(_logits(ordered[0].model, inputs), vanilla)
    assert torch.equal(_logits(ordered[1].model, inputs), rescaled), "the other model stays attached"
    ordered[1].detach()
    for model in (first, second):
        assert torch.equal(_logits(model, inputs), vanilla)
    assert first.config.text_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------- 3. checkpointing
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_backward(reentrant, one_thread_quiet):
    def grads(checkpointing):
        model = tiny_model("qwen2_5_vl", "sdpa")
        inputs = token_inputs()
        handle = attach_mixed(model, inputs)
        model.train()
        if checkpointing:
            with warnings.catch_warnings():  # renamed activation_checkpointing_enable in newer transformers
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert (handle.last_gains > 1).any()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, expected = grads(False)
    loss_ckpt, got = grads(True)
    assert torch.equal(loss, loss_ckpt)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_fine_tuning_steps_with_headgain_attached():
    model = tiny_model("llava", "sdpa")
    inputs = token_inputs()
    attach_mixed(model, inputs)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- 5. threads
def test_one_attached_model_in_several_threads(one_thread_quiet):
    model = tiny_model("qwen2_5_vl", "sdpa")
    prompts = [
        token_inputs(batch_lengths=(14, 10), image_span=span, seed=seed)
        for seed, span in enumerate([(3, 8), (2, 4), (5, 9), (1, 7)])
    ]
    handle = headgain.attach(model, cfg=CFG)
    expected = []
    for inputs in prompts:
        logits = _logits(model, inputs)
        expected.append((logits, handle.last_ratios))
    failures = []

    def work(i):
        try:
            for _ in range(6):
                logits = _logits(model, prompts[i])
                if not torch.equal(logits, expected[i][0]) or not torch.equal(handle.last_ratios, expected[i][1]):
                    failures.append(f"thread {i}: results differ from the single-threaded run")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


# ---------------------------------------------------------------------- 6. no leak
@pytest.mark.parametrize("kind", ["transformers", "torch"])
def test_an_attached_model_deleted_without_detach_is_freed(kind):
    if kind == "transformers":
        model = tiny_model("llava", "sdpa")
        handle = headgain.attach(model, cfg=CFG)
        _logits(model, token_inputs())
    else:
        from test_plain_torch import TinyDecoder, plain_map

        model = TinyDecoder()
        handle = headgain.attach(model, plain_map(), CFG)
        handle.set_visual_mask(torch.zeros(1, 6, dtype=torch.bool))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model(torch.randn(1, 6, 32))
    alive = weakref.ref(model)
    del model, handle
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------------- 7. only decoder modules change
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "llava", "phi4_multimodal"])
def test_attach_changes_no_config_and_detach_is_exact(model_type):
    model = tiny_model(model_type, "sdpa")
    inputs = token_inputs()
    before = _configs(model)
    vanilla = _logits(model, inputs)
    handle = headgain.attach(model, cfg=CFG)
    decoder = {layer.name for layer in handle.decoder.layers}
    for name, (config, backend) in _configs(model).items():
        if name in decoder:
            assert config is not before[name][0] and backend == "headgain_sdpa"
        else:
            assert (config, backend) == before[name], f"{name} must keep its config and backend"
    assert all(config._attn_implementation == backend for config, backend in before.values())
    handle.detach()
    assert _configs(model) == before
    assert torch.equal(_logits(model, inputs), vanilla)


# ---------------------------------------------------------------------- 8. visual masks
def test_a_visual_mask_serves_one_prompt_only(one_thread_quiet):
    model = tiny_model("qwen2_5_vl", "sdpa")
    first = token_inputs(image_span=(3, 8))
    second = token_inputs(image_span=(6, 11), seed=1)
    handle = headgain.attach(model, cfg=CFG)
    _logits(model, second)
    by_ids = handle.last_ratios
    handle.set_visual_mask(first["input_ids"] == IMAGE_ID)
    _logits(model, first)
    _logits(model, second)  # same shape, other image positions: its own ids count, not the old mask
    torch.testing.assert_close(handle.last_ratios, by_ids, rtol=0, atol=0)


def test_a_kept_visual_mask_wins_and_says_so(one_thread_quiet):
    model = tiny_model("qwen2_5_vl", "sdpa")
    first = token_inputs(image_span=(3, 8))
    second = token_inputs(image_span=(6, 11), seed=1)
    handle = headgain.attach(model, cfg=CFG)
    _logits(model, first)
    by_first = handle.last_ratios
    handle.set_visual_mask(first["input_ids"] == IMAGE_ID, keep=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _logits(model, first)  # agrees with the ids: no warning
    with pytest.warns(RuntimeWarning, match="disagrees with the visual token ids"):
        _logits(model, second)
    second_ratios = handle.last_ratios
    handle.set_visual_mask(None)
    _logits(model, second)
    assert not torch.equal(handle.last_ratios, second_ratios)
    with pytest.raises(headgain.HeadGainError, match="keep takes True or False"):
        handle.set_visual_mask(first["input_ids"] == IMAGE_ID, keep=1)
    assert by_first is not None


# ---------------------------------------------------------------------- 9. nested ids, layouts
def test_arch_map_names_a_nested_visual_id():
    model = tiny_model("llava", "sdpa")
    inputs = token_inputs()
    with headgain.attach(model, cfg=CFG) as handle:
        _logits(model, inputs)
        expected = handle.last_ratios
    model.config.vision_config.placeholder_id = IMAGE_ID
    nested = ArchMap("model.language_model.layers.*.self_attn", visual_token_ids=("vision_config.placeholder_id",))
    with headgain.attach(model, nested, CFG) as handle:
        _logits(model, inputs)
        torch.testing.assert_close(handle.last_ratios, expected, rtol=0, atol=0)
    with pytest.raises(headgain.ArchError, match="dotted paths such as 'vision_config.image_token_id' work"):
        headgain.attach(
            model,
            ArchMap("model.language_model.layers.*.self_attn", visual_token_ids=("vision_config.missing_id",)),
            CFG,
        )


# ---------------------------------------------------------------------- 10. bad values
def test_enabled_takes_bools_only():
    model = tiny_model("llava", "sdpa")
    handle = headgain.attach(model, cfg=CFG)
    for bad in (0, 1, "yes", None):
        with pytest.raises(headgain.HeadGainError, match="handle.enabled takes True or False"):
            handle.enabled = bad
    assert handle.enabled is True


def test_the_largest_gain_keeps_float16_logits_finite():
    model = tiny_model("qwen2_5_vl", "sdpa", dtype=torch.float16)
    inputs = token_inputs()
    handle = headgain.attach(
        model, cfg=dict(CFG, g_perc=headgain.core.config.MAX_GAIN, g_reas=headgain.core.config.MAX_GAIN)
    )
    logits = _logits(model, inputs)
    assert (handle.last_gains == headgain.core.config.MAX_GAIN).any()
    assert torch.isfinite(logits[inputs["attention_mask"].bool()]).all()
