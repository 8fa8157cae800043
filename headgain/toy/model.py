"""The toy model (a small Qwen2.5-VL), its prompts, batches and held-out accuracy.

Prompts follow the chat template of `headgain.toy.processor`: the user turn holds the
question, then the picture (so that the picture's tokens can attend to the question: a
model this small and this briefly trained does not learn to bind "red" and "circle" to one
object when the question comes after the picture); the assistant turn starts with a reasoning text between
``<think>`` and ``</think>`` (given, of a settable length: `headgain.toy.scenes.reasoning_text`)
and the model writes the answer after it.
"""

from __future__ import annotations

import torch
import transformers as tf

from .scenes import DEFAULT_REASONING, HELDOUT, QA, TASKS, Scene, make_qa, make_scene, reasoning_text

__all__ = ["TOY", "toy_config", "messages", "chat_prompt", "prompt_batch", "train_batch", "accuracy", "heldout"]

#: Sizes of the toy model: decoder and vision tower.
TOY = dict(
    layers=8,
    hidden=128,
    heads=8,
    kv_heads=4,
    intermediate=384,
    vision_depth=4,
    vision_hidden=128,
    vision_heads=4,
)


def toy_config(processor, **overrides) -> tf.Qwen2_5_VLConfig:
    """A `Qwen2_5_VLConfig` of the sizes in `TOY` (``overrides`` replace entries) for ``processor``'s vocabulary."""
    size = dict(TOY, **overrides)
    tok = processor.tokenizer
    half = size["hidden"] // size["heads"] // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in _IDS.items()}
    return tf.Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=size["hidden"],
            intermediate_size=size["intermediate"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            num_key_value_heads=size["kv_heads"],
            vocab_size=len(tok),
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=size["vision_depth"],
            hidden_size=size["vision_hidden"],
            intermediate_size=2 * size["vision_hidden"],
            num_heads=size["vision_heads"],
            out_hidden_size=size["hidden"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(range(size["vision_depth"])),
        ),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=True,
    )


_IDS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "pad": "<pad>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}


def _think(qa: QA, words: int, seed: int) -> str:
    text = reasoning_text(words, qa.about, seed)
    return f"<think> {text} </think>" if text else "<think> </think>"


def messages(turns: list[tuple[QA, int, int]]) -> list[dict]:
    """Chat messages (with the answers) for one picture and several questions.

    Args:
        turns: per question (qa, reasoning words, reasoning seed).
    """
    out: list[dict] = []
    for i, (qa, words, seed) in enumerate(turns):
        content = [{"type": "text", "text": qa.question}]
        if i == 0:
            content.append({"type": "image"})  # the question first, then the picture
        out.append({"role": "user", "content": content})
        out.append({"role": "assistant", "content": f"{_think(qa, words, seed)} {qa.answer}"})
    return out


def chat_prompt(processor, question: str, reasoning: str = "") -> str:
    """The prompt text for one picture and one question, the assistant turn opened with
    ``reasoning`` (words) between ``<think>`` and ``</think>``; the answer is left to the model."""
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]},
        {"role": "assistant", "content": f"<think> {reasoning} </think>" if reasoning else "<think> </think>"},
    ]
    return processor.apply_chat_template(msgs, continue_final_message=True)


def prompt_batch(processor, scenes: list[Scene], qas: list[QA], reasoning: int = DEFAULT_REASONING) -> dict:
    """Left-padded model inputs: one picture and one question per row, the reasoning text
    (``reasoning`` words, seeded by the scene) given, the answer left to the model."""
    texts = [
        chat_prompt(processor, qa.question, reasoning_text(reasoning, qa.about, s.seed)) for s, qa in zip(scenes, qas)
    ]
    return processor(images=[s.image for s in scenes], text=texts, return_tensors="pt", padding=True)


def train_batch(processor, dialogues: list[tuple[Scene, list[tuple[QA, int, int]]]]) -> dict:
    """Training inputs with ``labels``: the answers and the ``<|im_end|>`` after them are the
    targets, everything else (picture, questions, reasoning text, padding) is ignored (-100)."""
    texts = [processor.apply_chat_template(messages(turns)) for _, turns in dialogues]
    batch = processor(images=[s.image for s, _ in dialogues], text=texts, return_tensors="pt", padding=True)
    tok = processor.tokenizer
    think_end, im_end = tok.convert_tokens_to_ids("</think>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    for row in range(ids.shape[0]):
        inside = False
        for j, t in enumerate(ids[row].tolist()):
            if inside:
                labels[row, j] = t
                inside = t != im_end
            elif t == think_end:
                inside = True
    # the model predicts token j from position j - 1: labels are the ids, shifted inside the loss
    batch["labels"] = labels
    return batch


@torch.no_grad()
def accuracy(
    model,
    processor,
    task: str,
    seeds: range,
    reasoning: int = DEFAULT_REASONING,
    batch_size: int = 32,
) -> tuple[int, int]:
    """(correct, total) greedy first-word answers of ``task`` on the scenes of ``seeds``.

    The first answer word decides (exist, colour, count, position); for ``caption`` the
    whole caption is generated and must match exactly.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    model.eval()
    tok = processor.tokenizer
    correct = total = 0
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        scenes = [make_scene(s, task) for s in seeds[start : start + batch_size]]
        qas = [make_qa(s, task) for s in scenes]
        batch = prompt_batch(processor, scenes, qas, reasoning)
        if task == "caption":
            out = model.generate(**batch, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id)
            words = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(w.strip() == qa.answer for w, qa in zip(words, qas))
        else:
            logits = model(**batch).logits[:, -1]
            predicted = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
            correct += sum(p == qa.answer for p, qa in zip(predicted, qas))
        total += len(qas)
    return correct, total


def heldout(model, processor, scenes: int, reasoning: int = DEFAULT_REASONING, tasks=TASKS) -> dict:
    """Held-out accuracy per task on ``scenes`` scenes each (seeds from `HELDOUT` upwards):
    ``{task: {"correct", "total", "accuracy"}}``."""
    out = {}
    for task in tasks:
        correct, total = accuracy(model, processor, task, range(HELDOUT, HELDOUT + scenes), reasoning)
        out[task] = {"correct": correct, "total": total, "accuracy": correct / total}
    return out
