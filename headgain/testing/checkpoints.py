"""Tiny random-weight checkpoints written to a directory with a tokenizer, for servers that
load models from disk (vLLM's tests and benchmark; nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers as tf

__all__ = ["qwen2_checkpoint", "idefics3_checkpoint"]

#: The special tokens ``Idefics3Processor`` reads from its tokenizer.
IDEFICS3_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")


def _word_tokenizer(special: tuple[str, ...] = (), words: int = 300) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then the
    ``special`` tokens (split out wherever they occur), then ``w0``, ``w1``..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "<s>", "</s>", "<unk>", *special] + [f"w{i}" for i in range(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens(list(special))
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _sharpen(model: tf.PreTrainedModel) -> None:
    """Peakier attention and larger activations than the default init (fewer near-ties)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)


def _text_config(tokenizer, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def qwen2_checkpoint(
    path: str,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int = 256,
    sliding_window: int | None = None,
) -> tf.PreTrainedModel:
    """A random-weight Qwen2 decoder (float32; 304 words: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3, then ``w0``...) and a word-level tokenizer saved at ``path``; returns the
    model (weights as saved). Head dim 32 is the smallest vLLM's CPU attention takes.
    ``sliding_window``: every layer attends to that many tokens (vLLM's Qwen2 takes a window
    on all layers or none). ``AutoTokenizer`` (and vLLM) load the tokenizer as the class of
    model type qwen2, which splits text its own way: pass token ids, or load it back with
    ``transformers.PreTrainedTokenizerFast.from_pretrained(path)``."""
    tokenizer = _word_tokenizer()
    text = _text_config(tokenizer, layers, heads, kv_heads, head_dim, intermediate)
    if sliding_window is not None:
        text.update(
            use_sliding_window=True,
            sliding_window=sliding_window,
            max_window_layers=layers,
            layer_types=["sliding_attention"] * layers,
        )
    config = tf.Qwen2Config(**text)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def idefics3_checkpoint(
    path: str,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    image_size: int = 56,
    intermediate: int = 256,
) -> tf.PreTrainedModel:
    """A random-weight Idefics3 (Llama decoder, SigLIP-style vision tower of 2 blocks of width
    64, patch 14, pixel shuffle 2; float32) and its ``Idefics3Processor`` saved at ``path``;
    returns the model. Every picture is resized to ``image_size`` x ``image_size`` without
    splitting, so a prompt's ``<image>`` becomes ``<fake_token_around_image><global-img>``,
    ``(image_size / 28) ** 2`` ``<image>`` tokens, ``<fake_token_around_image>``. Tokenizer
    as `qwen2_checkpoint`'s with `IDEFICS3_TOKENS` at ids 4 to 7 (308 words)."""
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14, pixel shuffle 2), got {image_size}")
    tokenizer = _word_tokenizer(IDEFICS3_TOKENS)
    pil = getattr(tf, "Idefics3ImageProcessorPil", None) or tf.Idefics3ImageProcessor  # no torchvision needed
    side = {"longest_edge": image_size}
    images = pil(size=side, max_image_size=side, do_image_splitting=False)
    processor = tf.Idefics3Processor(images, tokenizer, image_seq_len=(image_size // 28) ** 2)
    text = _text_config(tokenizer, layers, heads, kv_heads, head_dim, intermediate)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = tf.Idefics3Config(
        text_config=dict(model_type="llama", **text),
        vision_config=dict(vision, image_size=image_size, patch_size=14),
        image_token_id=processor.image_token_id,
        scale_factor=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.Idefics3ForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model
