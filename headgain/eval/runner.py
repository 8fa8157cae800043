"""Runs: every arm (vanilla and each headgain config) on the same samples, one model.

`Evaluator` owns the model, its prompter and one headgain handle; an arm is a name and a
config (None: vanilla, the handle disabled), so the weights are loaded once and the
attached model is toggled between arms. `evaluate` runs the arms resumably into a folder
and writes the summary files.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

import torch

from ..core.config import HeadGainConfig
from . import extract
from .grade import is_correct
from .model import ModelSource, Prompter, PromptFn
from .sample import Sample
from .store import ArmStore, record_key
from .summary import plot_summary, save_json, summarize, write_markdown

__all__ = ["Evaluator", "evaluate", "distributed_rank", "VANILLA"]

VANILLA = "vanilla"


class Evaluator:
    """Generates answers of one model for samples, vanilla or with a headgain config.

    Args:
        model: a vision-language model (``generate`` is called on it).
        processor: its processor (chat template), or None for the embedded model.
        name: how the model is named in records and ``run.json``.
        arch_map: passed to `headgain.attach` (None: looked up by model type).
        prompt: builds the prompt texts (see `headgain.eval.model.Prompter`).
    """

    def __init__(
        self, model: torch.nn.Module, processor=None, name: str = "model", arch_map=None, prompt: PromptFn | None = None
    ):
        self.model, self.name, self.arch_map = model.eval(), name, arch_map
        self.prompter = Prompter(model, processor, prompt=prompt)
        self.handle = None

    @classmethod
    def from_source(cls, source: ModelSource, arch_map=None) -> Evaluator:
        model, processor = source()
        name = getattr(source, "name", type(model).__name__)
        return cls(model, processor, name, arch_map, getattr(source, "prompt", None))

    def check(self, configs: Sequence[HeadGainConfig | None]) -> None:
        """Attach headgain (with the first config) and validate every config against the
        model before anything is generated; raises `headgain.ConfigError` naming the bad
        fields."""
        real = [c for c in configs if c is not None]
        if not real:
            return
        self._arm(real[0])
        for cfg in real[1:]:
            cfg.check_layers(self.handle.num_layers)

    def _arm(self, cfg: HeadGainConfig | None) -> None:
        from ..core.handle import attach, handle_of

        if cfg is None:
            if self.handle is not None:
                self.handle.enabled = False
            return
        if self.handle is None:  # a handle the caller attached is used (its cfg is set per arm)
            self.handle = handle_of(self.model) or attach(self.model, self.arch_map, cfg)
        self.handle.cfg = cfg
        self.handle.enabled = True

    def generate(
        self, samples: Sequence[Sample], cfg: HeadGainConfig | None, max_new_tokens: int
    ) -> tuple[list[str], list[str], float]:
        """Greedy answers to ``samples`` in one left-padded batch.

        Returns:
            (prompts, outputs, seconds): the prompt texts, the decoded generations, and the
            wall time of the ``generate`` call.
        """
        self._arm(cfg)
        batch = self.prompter.inputs(samples)
        device = self.prompter.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        sequences = out.sequences if hasattr(out, "sequences") else out
        return self.prompter.texts(samples), self.prompter.decode(sequences[:, batch["input_ids"].shape[1] :]), seconds

    def run(
        self,
        samples: Sequence[Sample],
        arms: Mapping[str, HeadGainConfig | None],
        out: str,
        benchmark: str,
        *,
        max_new_tokens: int = 64,
        batch: int = 4,
        judge: extract.Judge | None = None,
        progress: bool | None = None,
        stream: TextIO | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> dict[str, list[dict]] | None:
        """Answer ``samples`` with every arm, resuming from the records in ``out``.

        Batches are fixed slices of the samples, and a batch counts as done only when all
        its records are on disk (else it is answered again whole, the newer records
        winning), so a resumed run batches, and therefore pads, every sample as an
        uninterrupted one would. After each batch its records are appended to
        ``out/<arm>.jsonl`` and flushed.

        Data parallel (``world`` > 1, ``torch.distributed`` initialised): rank r answers
        samples r, r + world, ... into ``out/<arm>.rank<r>.jsonl``; after a barrier rank 0
        reads every shard and returns all records, the other ranks return None.

        Returns:
            arm -> its records in sample order (dicts with ``key``, ``id``, ``arm``,
            ``prompt``, ``output``, ``answer``, ``rule``, ``gold``, ``correct``,
            ``seconds``).
        """
        self.check(list(arms.values()))
        os.makedirs(out, exist_ok=True)
        generation = {"max_new_tokens": max_new_tokens, "do_sample": False, "model": self.name}
        shard = None if world == 1 else rank
        stores = {arm: ArmStore(out, _file_name(arm), shard) for arm in arms}
        keys = {
            arm: [record_key(benchmark, s.id, arm, None if cfg is None else cfg.to_dict(), generation) for s in samples]
            for arm, cfg in arms.items()
        }
        mine = list(range(rank, len(samples), world))
        bar = _Progress(len(mine), list(arms), progress if rank == 0 else False, stream)
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            for arm, cfg in arms.items():
                if all(keys[arm][i] in stores[arm] for i in chunk):
                    continue  # else the whole batch, even one cut by a kill: the same padding
                prompts, outputs, seconds = self.generate([samples[i] for i in chunk], cfg, max_new_tokens)
                records = []
                for i, prompt, output in zip(chunk, prompts, outputs):
                    found = extract.answer(output, samples[i], judge)
                    records.append(
                        {
                            "key": keys[arm][i],
                            "id": samples[i].id,
                            "arm": arm,
                            "prompt": prompt,
                            "output": output,
                            "answer": found.value,
                            "rule": found.rule,
                            "gold": samples[i].answer,
                            "correct": is_correct(found.value, samples[i]),
                            "seconds": seconds / len(chunk),
                        }
                    )
                stores[arm].add(records)
            bar.update(
                start + len(chunk), lambda: {arm: [stores[arm].records.get(keys[arm][i]) for i in mine] for arm in arms}
            )
        bar.close()
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            if rank != 0:
                return None
            stores = {arm: ArmStore(out, _file_name(arm), shard) for arm in arms}
        return {arm: [stores[arm].records[k] for k in keys[arm]] for arm in arms}


def _file_name(arm: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in arm)


class _Progress:
    """One status line: samples done, ETA, and each arm's running accuracy."""

    def __init__(self, total: int, arms: list[str], enabled: bool | None, stream: TextIO | None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)()) if enabled is None else enabled
        self.total, self.arms, self.start, self.first = total, arms, time.perf_counter(), None

    def update(self, done: int, records: Callable[[], Mapping[str, list]]) -> None:
        """``records()``: arm -> this run's records so far (None where not yet answered)."""
        if not self.enabled:
            return
        records = records()
        if self.first is None:
            self.first = (done, time.perf_counter())
        d0, t0 = self.first
        rate = (done - d0) / (time.perf_counter() - t0) if done > d0 else 0.0
        eta = f"{(self.total - done) / rate:6.0f}s" if rate > 0 else "     ?"
        accs = []
        for arm in self.arms:
            done_recs = [r for r in records[arm] if r is not None]
            acc = sum(r["correct"] for r in done_recs) / len(done_recs) if done_recs else float("nan")
            accs.append(f"{arm} {acc:.3f}")
        self.stream.write(f"\r{done}/{self.total} ETA {eta} | accuracy: " + ", ".join(accs))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "headgain": __version__,
    }


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless launched by ``torchrun`` / ``accelerate
    launch`` with ``WORLD_SIZE`` > 1, in which case the default process group is set up
    (gloo: only barriers cross processes) if nobody has yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def evaluate(
    evaluator: Evaluator,
    samples: Sequence[Sample],
    configs: Mapping[str, HeadGainConfig],
    out: str,
    benchmark: str,
    *,
    max_new_tokens: int = 64,
    batch: int = 4,
    seed: int = 0,
    reps: int = 1000,
    judge: extract.Judge | None = None,
    synonyms: Mapping[str, str] | None = None,
    progress: bool | None = None,
) -> dict | None:
    """Vanilla and every config on ``samples``; writes into ``out``:

    * ``<arm>.jsonl``: per-sample records (see `Evaluator.run`);
    * ``summary.json`` (schema in `headgain.eval.summary`), ``summary.md``, ``summary.png``;
    * ``run.json``: benchmark, model, configs, generation settings, seed, versions and
      seconds per sample per arm.

    Returns the summary object (None on ranks other than 0 of a data-parallel run, see
    `distributed_rank`). ``seed`` seeds torch and the bootstrap.
    """
    if VANILLA in configs:
        raise ValueError(f"{VANILLA!r} names the arm without headgain; give the configs other names")
    torch.manual_seed(seed)
    arms: dict[str, HeadGainConfig | None] = {VANILLA: None, **configs}
    rank, world = distributed_rank()
    records = evaluator.run(
        samples,
        arms,
        out,
        benchmark,
        max_new_tokens=max_new_tokens,
        batch=batch,
        judge=judge,
        progress=progress,
        rank=rank,
        world=world,
    )
    if records is None:
        return None
    summary = summarize(benchmark, samples, records, reps=reps, seed=seed, synonyms=synonyms)
    timing = {arm: sum(r["seconds"] for r in recs) / len(recs) for arm, recs in records.items()}
    save_json(summary, os.path.join(out, "summary.json"))
    chart = plot_summary(summary, os.path.join(out, "summary.png"))
    write_markdown(summary, os.path.join(out, "summary.md"), chart, timing)
    run = {
        "benchmark": benchmark,
        "n": len(samples),
        "model": evaluator.name,
        "configs": {name: cfg.to_dict() for name, cfg in configs.items()},
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": False, "batch": batch},
        "judge": None if judge is None else f"{judge.__module__}:{getattr(judge, '__qualname__', repr(judge))}",
        "seed": seed,
        "seconds_per_sample": timing,
        "versions": _versions(),
    }
    save_json(run, os.path.join(out, "run.json"))
    return summary
