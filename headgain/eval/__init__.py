"""Evaluation: benchmark files -> samples -> model answers -> the paper's metrics.

* `headgain.eval.datasets.load`: VLMEvalKit TSV, Hugging Face folders and parquet, JSONL,
  mapped by one adapter per benchmark (`headgain.eval.adapters`) onto `Sample`.
* `headgain.eval.extract`: answers read off (reasoning) model outputs, by rules;
  `headgain.eval.grade.is_correct`.
* `headgain.eval.metrics`: accuracy, binary F1 and yes ratio, weighted F1,
  HallusionBench aAcc/fAcc/qAcc, CHAIR.
* `headgain.eval.stats`: paired bootstrap intervals, exact McNemar test.
* `headgain.eval.runner`: `Evaluator` (one model, vanilla and configs toggled) and
  `evaluate` (resumable runs, summary files); `headgain.eval.sweep`: tuning on a dev split.

Submodules are imported on use; ``datasets`` (the library) only for HF folders and parquet.
"""
