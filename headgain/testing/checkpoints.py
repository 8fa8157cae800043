"""Tiny random-weight checkpoints written to a directory with a tokenizer, for servers that
load models from disk (vLLM's tests and benchmark; nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers as tf

__all__ = ["qwen2_checkpoint"]


def qwen2_checkpoint(
    path: str, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int = 256
) -> tf.PreTrainedModel:
    """A random-weight Qwen2 decoder (float32; 304 words: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3, then ``w0``...) and a word-level tokenizer saved at ``path``; returns the
    model (weights as saved). Head dim 32 is the smallest vLLM's CPU attention takes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(300)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = tf.Qwen2Config(
        vocab_size=len(words),
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
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # peakier attention and larger activations than the default init
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
