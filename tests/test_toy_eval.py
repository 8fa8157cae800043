"""``headgain eval`` and ``headgain sweep`` on the built-in toy benchmarks, end to end on the
shipped toy model: records checked against a direct forward pass of the toy model on the
same scenes, CHAIR against a count written here, seeds and splits."""

from __future__ import annotations

import json
import re

import pytest
import torch

from headgain.cli import main
from headgain.toy import load
from headgain.toy.bench import scene_seed
from headgain.toy.model import prompt_batch
from headgain.toy.scenes import COLOURS, KINDS, make_qa, make_scene


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the command line uses for the toy model: equal numerics
    yield
    torch.set_num_threads(threads)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _eval(tmp_path, bench, *extra):
    out = tmp_path / bench.replace(":", "_")
    argv = ["eval", "--bench", bench, "--no-progress", "--reps", "50", "--device", "cpu", "--out", str(out), *extra]
    assert main(argv) == 0
    with open(out / "summary.json") as f:
        return out, json.load(f)


@pytest.mark.parametrize("bench, seed", [("toy:exist-adversarial", 0), ("toy:colour", 4), ("toy:count", 1)])
def test_eval_answers_are_the_toy_models_own(tmp_path, bench, seed):
    limit = 6
    out, summary = _eval(tmp_path, bench, "--limit", str(limit), "--seed", str(seed), "--configs", "ocean-r1-7b")
    assert summary["n"] == limit and summary["benchmark"] == f"{bench} (seed {seed})"
    vanilla = _records(out / "vanilla.jsonl")
    assert len(vanilla) == limit
    # the same scenes and questions, asked directly of the model one at a time (no padding)
    model, processor = load()
    task = bench.removeprefix("toy:")
    for i, record in enumerate(vanilla):
        scene = make_scene(scene_seed(seed, i), task)
        qa = make_qa(scene, task)
        assert record["id"] == f"{task}-{scene.seed}"
        with torch.no_grad():
            logits = model(**prompt_batch(processor, [scene], [qa])).logits[0, -1]
        word = processor.tokenizer.convert_ids_to_tokens(int(logits.argmax()))
        assert record["output"].split()[0] == word
        assert record["correct"] == (word == qa.answer), (record, qa)
    accuracy = sum(r["correct"] for r in vanilla) / limit
    assert summary["arms"]["vanilla"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)  # rounded to 6 places


def test_caption_chair_counts_the_named_objects_absent_from_the_picture(tmp_path):
    out, summary = _eval(tmp_path, "toy:caption", "--limit", "8", "--seed", "2", "--configs", "ocean-r1-7b")
    names = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(KINDS)})\b")
    for arm in ("vanilla", "ocean-r1-7b"):
        records = _records(out / f"{arm}.jsonl")
        mentions = bad = bad_captions = 0
        for i, record in enumerate(records):
            present = {o.name for o in make_scene(scene_seed(2, i), "caption").objects}
            said = [" ".join(m) for m in names.findall(record["output"])]
            wrong = [n for n in said if n not in present]
            mentions, bad, bad_captions = mentions + len(said), bad + len(wrong), bad_captions + bool(wrong)
        assert mentions > 0
        assert summary["arms"][arm]["chair_i"] == pytest.approx(bad / mentions, abs=1e-6)
        assert summary["arms"][arm]["chair_s"] == pytest.approx(bad_captions / len(records), abs=1e-6)


def test_seeds_and_splits_pick_the_scenes(tmp_path):
    out_a, _ = _eval(tmp_path / "a", "toy:exist", "--limit", "3", "--seed", "7", "--configs", "ocean-r1-7b")
    out_b, _ = _eval(tmp_path / "b", "toy:exist", "--limit", "3", "--split", "7", "--configs", "ocean-r1-7b")
    a, b = _records(out_a / "vanilla.jsonl"), _records(out_b / "vanilla.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] == [f"exist-{scene_seed(7, i)}" for i in range(3)]
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert main(["eval", "--bench", "toy:exist", "--split", "dev", "--out", str(tmp_path / "c")]) == 2
    assert main(["eval", "--bench", "toy:nothing", "--out", str(tmp_path / "d")]) == 2


def test_sweep_tunes_on_one_seed_and_reports_on_another(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--bench", "toy:exist", "--dev-split", "1", "--split", "2", "--limit", "6", "--search", "random"]
    argv += ["--trials", "2", "--min-samples", "3", "--reps", "50", "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--config", str(_toy_config(tmp_path))]) == 0
    with open(out / "sweep.json") as f:
        result = json.load(f)
    assert result["held_out"]["n"] == 6 and result["chosen"] in result["configs"]
    assert result["held_out"]["benchmark"] == "toy:exist (seed 2)"
    held = _records(out / "held_out" / "vanilla.jsonl")
    assert [r["id"] for r in held] == [f"exist-{scene_seed(2, i)}" for i in range(6)]


def _toy_config(tmp_path):
    from headgain import HeadGainConfig

    path = tmp_path / "toy.json"
    HeadGainConfig(l_perc=2, l_reas=5, tau_perc=0.3, tau_reas=0.05).to_json(str(path))
    return path


def test_reasoning_length_of_toy_benchmarks(tmp_path, capsys):
    """--reasoning sets the words of reasoning text each toy prompt gives before the answer;
    it names the benchmark (resumed records of another length are not reused), and other
    benchmarks refuse it."""
    from headgain.toy.scenes import reasoning_text

    out = tmp_path / "r"
    argv = ["eval", "--bench", "toy:count", "--limit", "2", "--max-new-tokens", "2", "--reps", "20", "--no-progress"]
    assert main([*argv, "--reasoning", "40", "--configs", "toy", "--out", str(out)]) == 0
    records = [json.loads(line) for line in open(out / "vanilla.jsonl")]
    for record in records:
        seed = int(record["id"].split("-")[-1])
        about = record["prompt"].split("how many ")[1].split()[0]
        assert f"<think> {reasoning_text(40, about, seed)} </think>" in record["prompt"]
    assert json.load(open(out / "summary.json"))["benchmark"] == "toy:count (seed 0) (40 words)"
    capsys.readouterr()
    assert main(["eval", "--bench", "shapes", "--reasoning", "4", "--out", str(tmp_path / "e")]) == 2
    assert "--reasoning applies to the toy benchmarks only" in capsys.readouterr().err
    assert main(["eval", "--bench", "toy:count", "--reasoning", "-1", "--out", str(tmp_path / "n")]) == 2
    assert "-1 must be at least 0" in capsys.readouterr().err
