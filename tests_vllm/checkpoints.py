"""Tiny random-weight checkpoints the vLLM tests write (nothing is downloaded)."""

import torch
import transformers as tf


def qwen2_checkpoint(path: str, layers: int, heads: int, kv_heads: int, head_dim: int) -> tf.PreTrainedModel:
    """A random-weight Qwen2 decoder and a word-level tokenizer saved at ``path``; returns the
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
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
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
