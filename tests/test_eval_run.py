"""Runs on the embedded tiny model: arms, records, summary, resume after a kill, the CLI, sweeps."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import matplotlib.pyplot  # noqa: F401  (imported before any fork: forked runs inherit it)
import pytest
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401  (as above)
from PIL import Image

from headgain import HeadGainConfig, presets
from headgain.cli import main
from headgain.eval import extract, metrics
from headgain.eval.grade import is_correct
from headgain.eval.model import embedded_source
from headgain.eval.runner import Evaluator, evaluate
from headgain.eval.sample import Sample
from headgain.eval.shapes import shapes
from headgain.eval.summary import summarize
from headgain.eval.sweep import candidates, split_dev
from headgain.testing.synthetic import draw_image
from headgain.testing.tiny import IMAGE_ID, byte_model, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the command line uses for the embedded model: equal numerics
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.from_source(embedded_source())


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_vanilla_arm_is_the_plain_model(evaluator):
    samples = shapes(4, seed=1)
    _, rescaled, _ = evaluator.generate(samples, presets["ocean-r1-7b"], 6)  # attaches headgain
    prompts, vanilla, _ = evaluator.generate(samples, None, 6)
    plain = byte_model()  # same seeded weights, headgain never attached
    batch = evaluator.prompter.inputs(samples)
    with torch.no_grad():
        ids = plain.generate(**batch, max_new_tokens=6, do_sample=False)
    assert vanilla == evaluator.prompter.decode(ids[:, batch["input_ids"].shape[1] :])
    assert rescaled != vanilla  # the gains change what the random-weight model says
    assert prompts[0].startswith("What colour are the discs?\nOptions:\nA. red")


def _jsonl_bench(path):
    os.makedirs(path / "img", exist_ok=True)
    rows = []
    for i in range(5):
        draw_image(size=(60, 60), seed=i).save(path / "img" / f"{i}.png")
        kinds = [
            {"options": ["red", "green", "blue"], "answer": "blue", "question": "Which colour is most common?"},
            {"answer": "3", "question": "How many shapes?"},
            {"answer": "yes", "question": "Is there a circle?"},
        ]
        rows.append(dict(kinds[i % 3], id=f"q{i}", image=f"img/{i}.png", category="even" if i % 2 == 0 else "odd"))
    with open(path / "bench.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path / "bench.jsonl")


def test_evaluate_records_agree_with_summary(evaluator, tmp_path):
    from headgain.eval.datasets import load

    samples = list(load(_jsonl_bench(tmp_path)))
    cfg = HeadGainConfig(l_perc=5, l_reas=4, tau_perc=0.12, tau_reas=0.08, g_perc=1.5, g_reas=1.5)
    out = str(tmp_path / "out")
    summary = evaluate(evaluator, samples, {"strong": cfg}, out, "mine", max_new_tokens=5, batch=2, reps=200)
    assert sorted(os.listdir(out)) == sorted(
        ["vanilla.jsonl", "strong.jsonl", "summary.json", "summary.md", "summary.png", "run.json"]
    )
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == summary
    correct = {}
    for arm in ("vanilla", "strong"):
        recs = _lines(os.path.join(out, f"{arm}.jsonl"))
        assert [r["id"] for r in recs] == [s.id for s in samples]
        for r, s in zip(recs, samples):  # the records are what the extractor and grader say
            found = extract.answer(r["output"], s)
            assert (r["answer"], r["rule"]) == (found.value, found.rule)
            assert r["correct"] == is_correct(found.value, s)
        correct[arm] = [r["correct"] for r in recs]
        values = summary["arms"][arm]
        assert values["accuracy"] == pytest.approx(sum(correct[arm]) / len(samples), abs=1e-6)
        choice = [(r["answer"], s.answer) for r, s in zip(recs, samples) if s.answer_type == "choice"]
        assert values["weighted_f1"] == pytest.approx(metrics.weighted_f1(*zip(*choice)), abs=1e-6)
        yes = [r["answer"] for r, s in zip(recs, samples) if s.answer_type == "yes_no"]
        assert values["yes_ratio"] == pytest.approx(sum(a is True for a in yes) / len(yes), abs=1e-6)
        assert set(values["accuracy_by_category"]) == {"even", "odd"}
    fixed = sum(1 for v, a in zip(correct["vanilla"], correct["strong"]) if a and not v)
    broken = sum(1 for v, a in zip(correct["vanilla"], correct["strong"]) if v and not a)
    rows = {c["metric"]: c for c in summary["comparisons"]}
    assert set(rows) == {"accuracy", "weighted_f1", "f1", "precision", "recall", "yes_ratio"}
    assert (rows["accuracy"]["fixed"], rows["accuracy"]["broken"]) == (fixed, broken)
    assert rows["accuracy"]["p_value"] is not None and rows["f1"]["p_value"] is None
    md = open(os.path.join(out, "summary.md")).read()
    assert "| accuracy |" in md and "![metrics per arm](summary.png)" in md and "seconds / sample" in md
    even = summary["arms"]["strong"]["accuracy_by_category"]["even"]
    assert f"| even | {summary['arms']['vanilla']['accuracy_by_category']['even']:.4f} | {even:.4f} |" in md
    with Image.open(os.path.join(out, "summary.png")) as img:
        assert img.format == "PNG" and min(img.size) > 200
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["configs"]["strong"] == cfg.to_dict() and run["generation"]["max_new_tokens"] == 5
    assert set(run["versions"]) == {"python", "torch", "transformers", "headgain"}
    # the same folder with other generation settings or another config: new records, old ones kept
    evaluate(evaluator, samples[:2], {"strong": cfg.replace(g_perc=1.2)}, out, "mine", max_new_tokens=4, reps=20)
    assert [len(_lines(os.path.join(out, f"{arm}.jsonl"))) for arm in ("vanilla", "strong")] == [7, 7]
    assert json.load(open(os.path.join(out, "summary.json")))["n"] == 2


def test_summary_comparisons_on_hallusion_records():
    samples, vanilla, arm = [], [], []
    outcomes = [(1, 1), (0, 1), (0, 1), (1, 0), (0, 0), (1, 1), (0, 1), (1, 1)]
    for i, (v, a) in enumerate(outcomes):
        meta = dict(
            category="VD", subcategory="chart", set_id=str(i // 4), figure_id=str(i // 2 % 2), question_id=str(i % 2)
        )
        samples.append(Sample(str(i), [], "q", {}, "yes", "yes_no", meta))
        vanilla.append({"answer": bool(v), "correct": bool(v)})
        arm.append({"answer": bool(a), "correct": bool(a)})
    out = summarize("hb", samples, {"vanilla": vanilla, "cfg": arm}, reps=300, seed=3)
    assert out["bootstrap"] == {"reps": 300, "seed": 3, "unit": "set"}
    hb_v = metrics.hallusion([dict(s.meta, correct=r["correct"]) for s, r in zip(samples, vanilla)])
    hb_a = metrics.hallusion([dict(s.meta, correct=r["correct"]) for s, r in zip(samples, arm)])
    rows = {c["metric"]: c for c in out["comparisons"]}
    for m in ("aAcc", "fAcc", "qAcc"):
        assert out["arms"]["vanilla"][m] == pytest.approx(hb_v[m]) and out["arms"]["cfg"][m] == pytest.approx(hb_a[m])
        assert rows[m]["delta"] == pytest.approx(hb_a[m] - hb_v[m])
        assert rows[m]["ci95"][0] <= rows[m]["delta"] <= rows[m]["ci95"][1]
    assert (rows["aAcc"]["fixed"], rows["aAcc"]["broken"]) == (3, 1)
    assert rows["aAcc"]["p_value"] == pytest.approx(2 * 5 / 16)  # 2 P(X <= 1), X ~ Bin(4, 1/2)
    assert rows["fAcc"]["p_value"] is None
    assert summarize("hb", samples, {"vanilla": vanilla, "cfg": arm}, reps=300, seed=3) == out


def _run_cli(args, capsys=None):
    rc = main(args)
    if capsys is not None:
        capsys.readouterr()
    return rc


def _quiet_cli(argv, folder):
    """The command line in a forked process, its output in files under ``folder``; one torch
    thread (OpenMP threads started in a child after the parent used them hang)."""
    torch.set_num_threads(1)
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        sys.stdout, sys.stderr = out, err
        sys.exit(main(argv))


def test_resume_after_kill_gives_the_same_summary(tmp_path, capsys):
    args = ["eval", "--bench", "shapes", "--limit", "8", "--batch", "2", "--max-new-tokens", "4", "--reps", "50"]
    args += ["--no-progress", "--configs", "ocean-r1-7b", "--device", "cpu"]
    killed = tmp_path / "killed"
    arm_file = killed / "ocean-r1-7b.jsonl"
    # the run to kill: a forked process (it inherits the imports), SIGKILLed after its first batch
    proc = multiprocessing.get_context("fork").Process(
        target=_quiet_cli, args=([*args, "--out", str(killed)], tmp_path)
    )
    proc.start()

    def kill_after_first_batch():
        deadline = time.time() + 120
        while time.time() < deadline and proc.is_alive():
            if arm_file.exists() and arm_file.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        proc.kill()
        proc.join()

    killer = threading.Thread(target=kill_after_first_batch)
    killer.start()
    fresh = tmp_path / "fresh"  # the same run, never killed: made while the other one runs
    assert _run_cli([*args, "--out", str(fresh)], capsys) == 0
    killer.join()
    assert proc.exitcode == -signal.SIGKILL
    assert arm_file.exists(), (tmp_path / "stderr.txt").read_text()[-2000:]  # it failed before its first batch
    done_before = (killed / "vanilla.jsonl").read_text().count("\n")
    assert 2 <= done_before < 8 and not (killed / "summary.json").exists()
    done = arm_file.read_text().count("\n")  # whole batches: records are written per batch
    assert done % 2 == 0 and done < 8
    with open(arm_file, "a") as f:  # a batch's write cut off after its first record, then mid-line
        stale = _lines(fresh / "ocean-r1-7b.jsonl")[done]
        f.write(json.dumps(dict(stale, output="stale")) + "\n" + '{"key": "half a rec')
    assert _run_cli([*args, "--out", str(killed)], capsys) == 0
    assert json.load(open(killed / "summary.json")) == json.load(open(fresh / "summary.json"))
    for name in ("vanilla.jsonl", "ocean-r1-7b.jsonl"):
        assert {r["id"] for r in _lines(killed / name)} == {f"shapes-{i}" for i in range(8)}  # nothing lost
        outputs = {r["id"]: r["output"] for r in _lines(killed / name)}  # later lines win, as on resume
        assert outputs == {r["id"]: r["output"] for r in _lines(fresh / name)}
    # a rerun of a finished run generates nothing and gives the same summary
    before = {n: (killed / n).read_text() for n in ("vanilla.jsonl", "ocean-r1-7b.jsonl", "summary.json")}
    assert _run_cli([*args, "--out", str(killed)], capsys) == 0
    assert before == {n: (killed / n).read_text() for n in before}


def test_cli_eval_tsv_configs_and_errors(tmp_path, capsys):
    import base64
    import io

    buf = io.BytesIO()
    draw_image(size=(56, 56)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    with open(tmp_path / "POPE.tsv", "w") as f:
        f.write("index\tquestion\tanswer\tcategory\timage\n")
        for i, (ans, cat) in enumerate(
            [("yes", "random"), ("no", "popular"), ("no", "random"), ("yes", "adversarial")]
        ):
            f.write(f"{i}\tIs there a {['cat', 'dog'][i % 2]} in the image?\t{ans}\t{cat}\t{image}\n")
    HeadGainConfig(l_perc=4, l_reas=6, tau_perc=0.2, tau_reas=0.05, g_perc=1.4, g_reas=1.2).to_json(
        str(tmp_path / "mine.json")
    )
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "--bench",
            str(tmp_path / "POPE.tsv"),
            "--limit",
            "3",
            "--configs",
            "ocean-r1-7b",
            str(tmp_path / "mine.json"),
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--reps",
            "50",
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["benchmark"] == "pope (POPE.tsv)" and summary["n"] == 3
    assert list(summary["arms"]) == ["vanilla", "ocean-r1-7b", "mine"]
    assert {"accuracy", "f1", "precision", "recall", "yes_ratio"} <= set(summary["arms"]["mine"])
    assert {(c["arm"], c["metric"]) for c in summary["comparisons"]} >= {("mine", "f1"), ("ocean-r1-7b", "yes_ratio")}
    assert "mine - vanilla, accuracy" in text and f"wrote {out / 'summary.md'}" in text

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "not a built-in benchmark (shapes, toy:exist," in error(["eval", "--bench", str(tmp_path / "nope.tsv")])
    (tmp_path / "vanilla.json").write_text(presets["ocean-r1-7b"].to_json())
    assert "named 'vanilla'" in error(["eval", "--bench", "shapes", "--configs", str(tmp_path / "vanilla.json")])
    assert "unknown preset 'nope'" in error(["eval", "--bench", "shapes", "--configs", "nope"])
    HeadGainConfig(l_perc=30).to_json(str(tmp_path / "deep.json"))
    message = error(
        ["eval", "--bench", "shapes", "--configs", str(tmp_path / "deep.json"), "--out", str(tmp_path / "d")]
    )
    assert "l_perc=30 outside the model" in message and not os.path.exists(tmp_path / "d" / "vanilla.jsonl")
    (tmp_path / "x.tsv").write_text("index\tquestion\n0\tq\n")
    assert "'answer' missing" in error(["eval", "--bench", str(tmp_path / "x.tsv")])


def test_candidates_and_dev_split():
    base = presets["ocean-r1-7b"]
    grid = candidates(base, num_layers=12)
    assert len(grid) == 27 and all(c.strategy == "enhance" for c in grid.values())
    assert {c.l_perc for c in grid.values()} == {5, 7, 9} and {c.l_reas for c in grid.values()} == {1, 3, 5}
    assert {c.g_perc for c in grid.values()} == {1.08, 1.16, 1.24}
    clipped = candidates(base, num_layers=8)  # l_perc 9 is clipped to 7: duplicates dropped
    assert len(clipped) == 27 and max(c.l_perc for c in clipped.values()) == 7
    both = candidates(base, 12, "random", trials=5, seed=4, strategies=("enhance", "mixed"))
    assert len(both) == 10 and candidates(base, 12, "random", trials=5, seed=4, strategies=("enhance", "mixed")) == both
    assert {c.strategy for c in both.values()} == {"enhance", "mixed"}
    samples = shapes(10)
    dev, held = split_dev(samples, 0.3, seed=0)
    assert len(dev) == 3 and len(held) == 7 and not {s.id for s in dev} & {s.id for s in held}
    assert split_dev(samples, 0.3, seed=0) == (dev, held) and split_dev(samples, 0.3, seed=1) != (dev, held)


def test_cli_sweep_tunes_on_dev_reports_on_held_out(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            "--bench",
            "shapes",
            "--limit",
            "10",
            "--dev-frac",
            "0.4",
            "--search",
            "random",
            "--trials",
            "3",
            "--min-samples",
            "2",
            "--max-new-tokens",
            "3",
            "--batch",
            "4",
            "--reps",
            "50",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    result = json.load(open(out / "sweep.json"))
    assert (result["n_dev"], result["n_held_out"]) == (4, 6)
    assert result["rung_sizes"][-1] == 4 and result["rung_sizes"] == sorted(result["rung_sizes"])
    assert len(result["configs"]) == 3 and result["chosen"] in result["configs"]
    for entry in result["configs"].values():
        assert 0.0 <= entry["selected_share"] <= 1.0 and 1 <= len(entry["dev"]) <= len(result["rung_sizes"])
    assert len(result["configs"][result["chosen"]]["dev"]) == len(result["rung_sizes"])
    dev_ids = {r["id"] for r in _lines(out / "dev" / "vanilla.jsonl")}
    held_ids = {r["id"] for r in _lines(out / "held_out" / "vanilla.jsonl")}
    assert len(dev_ids) == 4 and len(held_ids) == 6 and not dev_ids & held_ids
    assert list(result["held_out"]["arms"]) == ["vanilla", result["chosen"]]
    assert f"chosen: {result['chosen']}" in text
    assert main(["sweep", "--bench", "shapes", "--limit", "6", "--metric", "aAcc", "--out", str(tmp_path / "x")]) == 2
    assert "metric 'aAcc' is not computed for shapes; available: accuracy" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "dev")
    assert main(["sweep", "--bench", "shapes", "--dev-split", "test", "--split", "test"]) == 2
    assert "--dev-split test equals --split" in capsys.readouterr().err


def _llava_processor():
    """A LlavaProcessor built in memory: a byte-level BPE tokenizer trained on a few words
    whose "<image>" token gets the tiny models' IMAGE_ID, a CLIP image processor (PIL), a chat
    template."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=IMAGE_ID,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = "What colour are the discs? Options: A. red B. green C. blue D. yellow. How many Is there a user assistant"
    tok.train_from_iterator([words] * 5, trainer)
    assert tok.get_vocab_size() == IMAGE_ID
    tok.add_special_tokens(["<image>"])  # id IMAGE_ID
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return tf.LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )


def test_processor_path_chat_template_left_padding(tmp_path):
    processor = _llava_processor()
    evaluator = Evaluator(tiny_model("llava"), processor, name="tiny llava")
    samples = shapes(3, seed=2) + [Sample("blind", [], "Is there a red disc?", {}, "no", "yes_no")]
    cfg = HeadGainConfig(l_perc=1, l_reas=2, tau_perc=0.2, tau_reas=0.1, g_perc=1.5, g_reas=1.5)
    with pytest.warns(RuntimeWarning, match="no visual tokens"):  # the blind sample is left untouched
        records = evaluator.run(
            samples, {"vanilla": None, "cfg": cfg}, str(tmp_path), "shapes", max_new_tokens=4, batch=4
        )
    prompts = [r["prompt"] for r in records["vanilla"]]
    assert prompts[0] == "user: <image>What colour are the discs?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n" + (
        "Answer with the option's letter from the given choices. assistant:"
    )
    assert "<image>" not in prompts[3]  # a question without a figure (HallusionBench has some)
    batch = processor(text=prompts, images=[s.images[0] for s in samples[:3]], return_tensors="pt", padding=True)
    assert (batch["input_ids"] == IMAGE_ID).sum(1).tolist() == [4, 4, 4, 0]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding (the prompter set it)
    plain = tiny_model("llava")  # same seeded weights, headgain never attached
    with torch.no_grad():
        ids = plain.generate(**batch, max_new_tokens=4, do_sample=False)
    expected = processor.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [r["output"] for r in records["vanilla"]] == expected
    assert [r["output"] for r in records["cfg"]] != expected


def test_summary_chair_on_captions():
    synonyms = {"puppy": "dog", "man": "person", "dog": "dog", "cat": "cat", "person": "person"}
    samples = [
        Sample("a", [], "Describe.", {}, "", "text", {"objects": ["dog", "person"]}),
        Sample("b", [], "Describe.", {}, "", "text", {"objects": ["cat"]}),
        Sample("c", [], "Describe.", {}, "", "text", {"objects": ["cat"]}),
    ]
    vanilla = ["A man with a puppy and a cat.", "A cat.", "A dog and a cat."]
    arm = ["A man with a puppy.", "A cat.", "A cat."]
    records = {
        name: [{"answer": t, "correct": False} for t in texts] for name, texts in (("vanilla", vanilla), ("arm", arm))
    }
    out = summarize("captions", samples, records, reps=100, synonyms=synonyms)
    objects = [s.meta["objects"] for s in samples]
    for name, texts in (("vanilla", vanilla), ("arm", arm)):
        expected = metrics.chair(texts, objects, synonyms)
        assert out["arms"][name]["chair_s"] == pytest.approx(expected["chair_s"], abs=1e-6)
        assert out["arms"][name]["chair_i"] == pytest.approx(expected["chair_i"], abs=1e-6)
    assert out["arms"]["vanilla"]["chair_s"] == pytest.approx(2 / 3, abs=1e-6)  # hand count: captions a and c
    rows = {c["metric"]: c for c in out["comparisons"]}
    assert rows["chair_s"]["delta"] == pytest.approx(-2 / 3, abs=1e-6)


def test_progress_line_shows_eta_and_running_accuracy(evaluator, tmp_path):
    import io

    stream = io.StringIO()
    samples = shapes(4, seed=3)
    evaluator.run(
        samples, {"vanilla": None}, str(tmp_path), "shapes", max_new_tokens=2, batch=2, progress=True, stream=stream
    )
    lines = stream.getvalue().split("\r")
    assert lines[1].startswith("2/4 ETA") and lines[2].startswith("4/4 ETA") and lines[2].endswith("\n")
    assert "accuracy: vanilla 0.000" in lines[2]


def test_cli_eval_local_checkpoint(tmp_path, capsys):
    folder = str(tmp_path / "tiny-llava")
    tiny_model("llava").save_pretrained(folder)
    _llava_processor().save_pretrained(folder)
    HeadGainConfig(l_perc=1, l_reas=2, tau_perc=0.2, tau_reas=0.1).to_json(str(tmp_path / "small.json"))
    out = tmp_path / "out"
    argv = ["eval", "--bench", "shapes", "--limit", "2", "--model", folder, "--configs", str(tmp_path / "small.json")]
    assert main([*argv, "--max-new-tokens", "3", "--reps", "20", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    run = json.load(open(out / "run.json"))
    assert run["model"] == folder and list(run["configs"]) == ["small"]
    records = _lines(out / "small.jsonl")
    assert [r["prompt"][:13] for r in records] == ["user: <image>"] * 2  # the saved chat template
    assert main(["eval", "--bench", "shapes", "--model", str(tmp_path / "nothing")]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_cli_eval_judge_decides_what_no_rule_reads(tmp_path, capsys, monkeypatch):
    """--judge MODULE:FUNCTION is asked only where no rule reads an answer, and its verdict is
    graded like a rule's; bad specs are refused with the reason."""
    (tmp_path / "my_judges.py").write_text(
        "import json\n"
        "CALLS = []\n"
        "def gold(text, sample):\n"
        "    CALLS.append((text, sample.id))\n"
        "    return {'yes': True, 'no': False}.get(sample.answer, sample.answer)\n"
    )
    monkeypatch.chdir(tmp_path)  # judges are imported from the working directory
    out = tmp_path / "out"
    argv = ["eval", "--bench", "shapes", "--limit", "9", "--configs", "ocean-r1-7b", "--judge", "my_judges:gold"]
    assert main([*argv, "--max-new-tokens", "3", "--reps", "20", "--no-progress", "--out", str(out)]) == 0
    import my_judges

    records = [json.loads(line) for line in open(out / "vanilla.jsonl")]
    judged = [r for r in records if r["rule"] == "judge"]
    asked = {sample_id for _, sample_id in my_judges.CALLS}
    # the random model's 3-byte replies leave most answers to the judge, which gives the gold answer
    assert judged and all(r["correct"] for r in judged)
    assert {r["id"] for r in judged} <= asked
    assert all(r["rule"] != "none" for r in records)  # the judge answered every reply no rule could read
    assert json.load(open(out / "run.json"))["judge"] == "my_judges:gold"
    capsys.readouterr()

    def error(spec):
        assert main(["eval", "--bench", "shapes", "--judge", spec, "--out", str(tmp_path / "e")]) == 2
        return capsys.readouterr().err

    assert "expected MODULE:FUNCTION" in error("my_judges")
    assert "cannot import module 'nowhere'" in error("nowhere:gold")
    assert "has no attribute 'silver'" in error("my_judges:silver")
    assert "not a callable" in error("my_judges:CALLS")


def test_cli_sweep_asks_the_judge_on_dev_and_held_out(tmp_path, capsys, monkeypatch):
    """headgain sweep takes --judge as eval does: the dev rungs and the held-out run both ask it
    where no rule reads an answer, so the config is chosen and reported on the same grading."""
    (tmp_path / "sweep_judges.py").write_text(
        "def gold(text, sample):\n    return {'yes': True, 'no': False}.get(sample.answer, sample.answer)\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", "--bench", "shapes", "--limit", "8", "--dev-frac", "0.5", "--search", "random"]
    argv += ["--trials", "2", "--min-samples", "2", "--max-new-tokens", "3", "--reps", "20"]
    assert main([*argv, "--judge", "sweep_judges:gold", "--out", str(out)]) == 0
    for part in ("dev", "held_out"):
        records = [json.loads(line) for line in open(out / part / "vanilla.jsonl")]
        judged = [r for r in records if r["rule"] == "judge"]
        # the random model's 3-byte replies leave answers to the judge, which gives the gold answer
        assert judged and all(r["correct"] for r in judged), part
    assert json.load(open(out / "held_out" / "run.json"))["judge"] == "sweep_judges:gold"
    capsys.readouterr()
    assert main([*argv, "--judge", "sweep_judges", "--out", str(tmp_path / "e")]) == 2
    assert "expected MODULE:FUNCTION" in capsys.readouterr().err
