"""Every registered architecture: ratios and logits against independent eager references."""

import pathlib

import pytest
import torch
import transformers
from support import (
    attach_gain_hooks,
    attach_mixed,
    check_steps_against_eager,
    reference_ratios,
    skip_moved_decoder,
    token_inputs,
    twin_models,
    visual_of,
)

import headgain
from headgain.testing.tiny import ARCHS, REQUIRES

NO_IDS = {"deepseek_v3", "gemma3n_text", "llama4_text"}  # the decoder alone: visual positions are given explicitly
#: model types whose forward fails in some transformers versions without headgain: skipped there
#: (their decoder is tested alone under its text model type)
BROKEN_FORWARD = {
    "llama4": "Llama4ForConditionalGeneration.forward reads image_outputs from its language model's output, "
    "which has none (AttributeError)",
}


def _skip_broken_forward(model, inputs, arch):
    if arch in BROKEN_FORWARD:
        try:
            with torch.no_grad():
                model(**inputs)
        except AttributeError:
            pytest.skip(f"transformers {transformers.__version__}: {BROKEN_FORWARD[arch]}")


def _attach_mixed(model, inputs, arch):
    visual = visual_of(inputs["input_ids"], inputs["attention_mask"]) if arch in NO_IDS else None
    return attach_mixed(model, inputs, visual)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ratios_and_logits_match_eager_reference(arch, backend):
    if arch in REQUIRES:
        pytest.importorskip(REQUIRES[arch])
    model, ref = twin_models(arch, backend)
    inputs = token_inputs()
    skip_moved_decoder(model, arch)
    _skip_broken_forward(model, inputs, arch)
    handle = _attach_mixed(model, inputs, arch)
    with torch.no_grad():
        logits = model(**inputs).logits
    ratios, gains = handle.last_ratios, handle.last_gains
    assert ratios.dtype == torch.float32 and ratios.shape == (handle.num_layers, 2, handle.num_heads)
    assert gains.shape == ratios.shape
    assert (gains > 1).any() and (gains == 1).any(), "the chosen config must select some heads and leave others"

    remove = attach_gain_hooks(ref, [gains])
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
    remove()
    expected = reference_ratios(out.attentions, visual_of(inputs["input_ids"], inputs["attention_mask"]))
    torch.testing.assert_close(ratios, expected, atol=2e-5, rtol=1e-4)
    real = inputs["attention_mask"].bool()  # padded rows attend to nothing: backends differ there
    torch.testing.assert_close(logits[real], out.logits[real], atol=2e-5, rtol=1e-4)
    handle.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_matches_eager_reference(arch):
    if arch in REQUIRES:
        pytest.importorskip(REQUIRES[arch])
    model, ref = twin_models(arch)
    inputs = token_inputs()
    skip_moved_decoder(model, arch)
    _skip_broken_forward(model, inputs, arch)
    steps, _ = check_steps_against_eager(model, ref, inputs, _attach_mixed(model, inputs, arch), new=3)
    assert any((g > 1).any() for _, g in steps)


def test_the_readme_names_every_registered_and_refused_model_type():
    from headgain.adapters.hf_archs import BUILTIN, UNSUPPORTED

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Supported architectures") :]
    missing = [name for name in [*BUILTIN, *UNSUPPORTED] if f"`{name}`" not in section]
    assert not missing, f"README's architecture section lacks {missing}"


def test_registry_covers_the_tested_architectures():
    registered = headgain.registered_archs()
    assert set(ARCHS) <= set(registered)
    assert "kimi_vl" in registered and "language_model.model.layers" in registered["kimi_vl"].attention


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava", "deepseek_v3"])
def test_sdpa_and_eager_agree(arch):
    sdpa, eager = twin_models(arch)
    inputs = token_inputs()
    results = []
    for model in (sdpa, eager):
        handle = _attach_mixed(model, inputs, arch)
        if results:
            handle.cfg = results[0][2]
        with torch.no_grad():
            model(**inputs)
        results.append((handle.last_ratios, handle.last_gains, handle.cfg))
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-5, rtol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
