"""End-to-end demo on the embedded toy model: nothing is fetched.

The toy model (a small Qwen2.5-VL trained on drawn scenes, shipped in `headgain.toy`)
looks at a drawn picture (saved to ``--image``) and answers a question about it, once
vanilla and once with headgain attached; then the heads headgain selects where the first
answer word is written are shown per decoder layer.

Run: ``python -m headgain.demo`` (``make demo``).
"""

from __future__ import annotations

import argparse
import time

import torch

import headgain
from headgain.core.rules import HeadClass, classify, selected_heads
from headgain.toy import WEIGHTS, load
from headgain.toy.model import prompt_batch
from headgain.toy.scenes import DEFAULT_REASONING, TASKS, make_qa, make_scene

_MARK = {HeadClass.NEUTRAL: ".", HeadClass.PERCEPTION: "P", HeadClass.REASONING: "R"}


def summarize(handle: headgain.Handle, sample: int = 0) -> str:
    """Per-layer head map (P perception, R reasoning, . neutral), mean S_v and the selected
    heads of the last forward pass of ``handle`` for ``sample``."""
    ratios = handle.last_ratios[:, sample]
    cfg = handle.cfg
    classes = classify(ratios.numpy(), cfg)
    lines = [
        f"{'layer':>5}  {'heads':<{ratios.shape[1]}}  {'mean S_v':>8}  perception (gain {cfg.g_perc})  "
        f"reasoning (gain {cfg.g_reas})"
    ]
    for layer, (p, r) in enumerate(selected_heads(classes)):
        row = "".join(_MARK[HeadClass(c)] for c in classes[layer])
        lines.append(f"{layer:>5}  {row}  {ratios[layer].mean():>8.3f}  {_heads(p):<26}  {_heads(r)}")
    selected = int((classes != HeadClass.NEUTRAL).sum())
    lines.append(
        f"selected {selected} of {classes.size} heads ({100 * selected / classes.size:.1f}%); "
        "the paper's sweet spot is about 6.4%"
    )
    return "\n".join(lines)


def _heads(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="toy", help="a preset whose layers fit 8 decoder layers")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--task", default="exist-adversarial", choices=TASKS)
    parser.add_argument("--seed", type=int, default=7, help="the scene")
    parser.add_argument("--reasoning", type=int, default=DEFAULT_REASONING, help="words of reasoning text")
    parser.add_argument("--image", default="headgain-demo.png", help="where the picture is saved")
    parser.add_argument("--weights", default=WEIGHTS, help="toy model folder (default: the shipped weights)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the toy model's matrices are too small to gain from threads
    model, processor = load(args.attn, path=args.weights)
    scene = make_scene(args.seed, args.task)
    qa = make_qa(scene, args.task)
    scene.image.save(args.image)
    inputs = prompt_batch(processor, [scene], [qa], args.reasoning)
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"headgain demo: toy Qwen2.5-VL ({layers} decoder layers x {heads} heads, {args.attn}), trained weights")
    print(
        f"picture: {args.image} ({scene.image.width}x{scene.image.height}, {visual} visual tokens): "
        f"{', '.join(o.name for o in scene.objects)} on a {scene.background} background"
    )
    print(f"question: {qa.question}   (expected: {qa.answer}; {args.reasoning} words of reasoning before the answer)")
    if headgain.extension_available():
        cuda = "with" if headgain.extension_available("cuda") else "without"
        print(f"compiled extension: loaded ({cuda} CUDA kernels)\n")
    else:
        print("compiled extension: not built (PyTorch fallback)\n")

    def answer():
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return text.strip(), time.perf_counter() - start

    text, seconds = answer()
    print(f"vanilla : {text!r}  ({seconds:.2f} s)")
    with headgain.attach(model, cfg=args.preset) as handle:
        text, seconds = answer()
        print(f"headgain: {text!r}  ({seconds:.2f} s, preset {args.preset})\n")
        with torch.no_grad():
            model(**inputs)  # the prompt pass again: its last position writes the first answer word
        print("heads selected where the first answer word is written (P perception, R reasoning):")
        print(summarize(handle))


if __name__ == "__main__":
    main()
