"""generate() of models that generate through a submodule (BLIP-2, InstructBLIP): their
top model's forward never runs; passes start at the decoder module, and the visual
positions come from the input_ids given to the attached model's generate()."""

import pytest
import torch
import transformers as tf

import headgain

IMAGE = 300
OPT = dict(
    vocab_size=320,
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    word_embed_proj_dim=64,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    model_type="opt",
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32)
MODELS = {
    "blip-2": (tf.Blip2Config, tf.Blip2ForConditionalGeneration),
    "instructblip": (tf.InstructBlipConfig, tf.InstructBlipForConditionalGeneration),
}


def _pair(name, backend="sdpa"):
    config_cls, model_cls = MODELS[name]
    config = config_cls(
        vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=4, image_token_index=IMAGE
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    config = config_cls(
        vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=4, image_token_index=IMAGE
    )
    config._attn_implementation = "eager"
    ref = model_cls(config).eval()
    ref.load_state_dict(model.state_dict())
    if backend == "sdpa":
        model.set_attn_implementation("sdpa")
    ids = torch.tensor([[IMAGE] * 4 + [1, 5, 6, 7, 8], [0, 0] + [IMAGE] * 4 + [1, 9, 10]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.randn(2, 3, 28, 28))
    if name == "instructblip":
        inputs.update(
            qformer_input_ids=torch.tensor([[1, 5, 6], [1, 7, 8]]),
            qformer_attention_mask=torch.ones(2, 3, dtype=torch.long),
        )
    return model, ref, inputs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_through_a_submodule_reads_every_step(name, one_thread_quiet):
    model, ref, inputs = _pair(name)
    with torch.no_grad():
        vanilla = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    handle = headgain.attach(model, cfg=dict(l_perc=0, l_reas=1, tau_perc=0.3, tau_reas=0.2, g_perc=1.0, g_reas=1.0))
    steps = []
    decoder = model.language_model.model.decoder
    hook = decoder.register_forward_hook(lambda m, a, o: steps.append(handle.last_ratios))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    hook.remove()
    assert torch.equal(out, vanilla), "gains of one give the vanilla tokens"
    assert len(steps) == 4
    n = inputs["input_ids"].shape[1]
    full = torch.cat([inputs["input_ids"], out[:, n:-1]], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        reference = ref(**dict(inputs, input_ids=full, attention_mask=mask), output_attentions=True)
    visual = (full == IMAGE).float()
    for t, ratios in enumerate(steps):
        expected = torch.stack(
            [(a[:, :, n - 1 + t] * visual[:, None]).sum(-1) for a in reference.language_model_outputs.attentions]
        )
        torch.testing.assert_close(ratios, expected, atol=2e-5, rtol=1e-4)
    assert (steps[0] > 0.01).any()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rescaled_generate_through_a_submodule(name, one_thread_quiet):
    model, _, inputs = _pair(name)
    handle = headgain.attach(model, cfg=dict(l_perc=0, l_reas=1, tau_perc=0.3, tau_reas=0.2, g_perc=1.5, g_reas=1.7))
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert (handle.last_gains > 1).any() and handle.last_has_visual.all()
    handle.detach()
    assert "generate" not in model.__dict__
