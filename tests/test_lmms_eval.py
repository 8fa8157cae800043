"""lmms-eval's ``--model headgain`` (`headgain.eval.lmms`), end to end: the lmms-eval command
line runs two tasks written here (drawn toy scenes in a local ``datasets`` folder: a
generation task and a yes/no multiple-choice task) on the shipped toy model, vanilla
(``cfg=none``) and with a strong config from a JSON file; the answers and choice losses
are checked against the toy model's own ``generate`` and forward pass, with `headgain.attach`
applied here by hand."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3 and its dependencies: see README)",
)

from headgain import ConfigError, HeadGainConfig, attach, presets  # noqa: E402
from headgain.toy import load  # noqa: E402
from headgain.toy.model import chat_prompt  # noqa: E402
from headgain.toy.scenes import make_qa, make_scene  # noqa: E402

#: (scene seed, question kind) of the generation task; the existence questions also form the yes/no task
QUESTIONS = [(1, "exist"), (2, "exist-adversarial"), (3, "colour"), (4, "count"), (5, "exist"), (6, "exist-popular")]
MAX_NEW_TOKENS = 4
BATCH = 2
#: most heads x5: some answers of the toy model change (x3 leaves the trained model's answers as they are)
STRONG = HeadGainConfig(l_perc=7, tau_perc=0.3, g_perc=5.0, l_reas=0, tau_reas=0.1, g_reas=5.0)

GENERATE_YAML = """task: hg_qa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
metric_list:
  - metric: exact_match
"""

CHOICE_YAML = """task: hg_yesno
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: image
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _rows(kinds=None):
    rows = []
    for seed, kind in QUESTIONS:
        if kinds is None or kind.startswith(kinds):
            scene = make_scene(seed, kind)
            qa = make_qa(scene, kind)
            rows.append({"image": scene.image, "question": qa.question, "answer": qa.answer})
    return rows


def _write_task(folder, name, yaml, rows):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    data = os.path.join(folder, f"{name}_data")
    columns = {key: [row[key] for row in rows] for key in features}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(data)
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(yaml.format(data=data, max_new_tokens=MAX_NEW_TOKENS))


def _lmms_eval(tmp, tasks, cfg, arm):
    """Run the lmms-eval command line; its logged samples as task -> records in doc order."""
    out = os.path.join(tmp, arm)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=os.path.join(tmp, "hf"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "lmms_eval", "--model", "headgain", "--model_args", f"pretrained=toy,cfg={cfg}"]
    command += ["--tasks", "hg_qa,hg_yesno", "--include_path", tasks, "--batch_size", str(BATCH)]
    command += ["--device", "cpu", "--output_path", out, "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {}
    for task in ("hg_qa", "hg_yesno"):
        (path,) = glob.glob(os.path.join(out, "**", f"*_samples_{task}.jsonl"), recursive=True)
        with open(path) as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    return samples


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lmms-eval's records with the strong config (a JSON file) and vanilla (cfg=none)."""
    if not any(ep.name == "headgain" for ep in entry_points(group="lmms_eval.models")):
        pytest.fail("the entry point lmms_eval.models:headgain is missing: reinstall headgain (pip install -e .)")
    tmp = str(tmp_path_factory.mktemp("lmms"))
    tasks = os.path.join(tmp, "tasks")
    os.makedirs(tasks)
    _write_task(tasks, "hg_qa", GENERATE_YAML, _rows())
    _write_task(tasks, "hg_yesno", CHOICE_YAML, _rows("exist"))
    strong = os.path.join(tmp, "strong.json")
    STRONG.to_json(strong)
    return {"strong": _lmms_eval(tmp, tasks, strong, "strong"), "vanilla": _lmms_eval(tmp, tasks, "none", "vanilla")}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command line runs (OMP_NUM_THREADS=1): equal numerics
    yield
    torch.set_num_threads(threads)


def _toy(cfg):
    model, processor = load()
    processor.tokenizer.padding_side = "left"
    if cfg is not None:
        attach(model, None, cfg)
    return model, processor


def _reference_answers(cfg):
    """Greedy answers of the toy model in the batches lmms-eval forms (request order)."""
    model, processor = _toy(cfg)
    rows, answers = _rows(), []
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        texts = [chat_prompt(processor, row["question"]) for row in batch]
        inputs = processor(images=[row["image"] for row in batch], text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _reference_scores(cfg):
    """(loss, is greedy) of "yes" and "no" per yes/no question (one token each: the loss is
    minus its log-probability) from the next-token distribution after the prompt, one forward pass."""
    model, processor = _toy(cfg)
    scores = []
    for row in _rows("exist"):
        inputs = processor(images=[row["image"]], text=[chat_prompt(processor, row["question"])], return_tensors="pt")
        with torch.no_grad():
            logprobs = model(**inputs).logits[0, -1].log_softmax(-1)
        ids = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
        scores.append([(-logprobs[i].item(), logprobs.argmax().item() == i) for i in ids])
    return scores


@pytest.mark.parametrize("arm, cfg", [("strong", STRONG), ("vanilla", None)])
def test_answers_are_the_models_own(runs, arm, cfg):
    got = [record["filtered_resps"] for record in runs[arm]["hg_qa"]]
    assert [r["doc_id"] for r in runs[arm]["hg_qa"]] == list(range(len(QUESTIONS)))
    assert got == _reference_answers(cfg)


@pytest.mark.parametrize("arm, cfg", [("strong", STRONG), ("vanilla", None)])
def test_loglikelihoods_are_the_models_own(runs, arm, cfg):
    records = runs[arm]["hg_yesno"]
    expected = _reference_scores(cfg)
    assert len(records) == len(expected)
    for record, choices in zip(records, expected):
        got = [(float(loss), str(greedy) == "True") for loss, greedy in record["filtered_resps"]]  # logged as text
        assert [g for _, g in got] == [g for _, g in choices]
        assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in choices], abs=1e-4)


def test_the_config_changes_the_model(runs):
    answers = {arm: [r["filtered_resps"] for r in runs[arm]["hg_qa"]] for arm in runs}
    assert answers["strong"] != answers["vanilla"]
    for strong, vanilla in zip(runs["strong"]["hg_yesno"], runs["vanilla"]["hg_yesno"]):
        assert abs(float(strong["filtered_resps"][0][0]) - float(vanilla["filtered_resps"][0][0])) > 1e-3


def test_model_args_are_checked(tmp_path):
    from headgain.eval.lmms import HeadGainLMM, parse_cfg

    with pytest.raises(ConfigError, match="not a preset .* or none"):
        HeadGainLMM(pretrained="toy", cfg="ocean-r2")
    with pytest.raises(ValueError, match="unknown model argument.*max_pixels.*it takes pretrained, cfg"):
        HeadGainLMM(pretrained="toy", cfg="toy", max_pixels=4)
    with pytest.raises(ValueError, match="needs pretrained="):
        HeadGainLMM(pretrained="toy")
    with pytest.raises(ValueError, match="batch_size=auto"):
        HeadGainLMM(pretrained="toy", cfg="toy", batch_size="auto")
    bad = tmp_path / "bad.json"
    bad.write_text('{"g_perc": 99}')
    with pytest.raises(ConfigError, match="cfg=.*bad.json.*g_perc"):
        parse_cfg(str(bad))
    assert parse_cfg("None") is None and parse_cfg("toy") is presets["toy"]
    assert parse_cfg('{"g_perc": 1.5}') == HeadGainConfig(g_perc=1.5)


def test_generation_arguments():
    from headgain.eval.lmms import DEFAULT_MAX_NEW_TOKENS, cut, generation_kwargs

    task = {"until": ["\n\n", "Q:"], "temperature": 0, "top_p": 1.0, "num_beams": 1, "image_aspect_ratio": "pad"}
    until, kwargs, ignored = generation_kwargs(task)
    assert until == ["\n\n", "Q:"] and ignored == ["image_aspect_ratio"]
    assert kwargs == {"num_beams": 1, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
    until, kwargs, _ = generation_kwargs({"until": "END", "temperature": 0.7, "max_new_tokens": 9})
    assert until == ["END"] and kwargs == {"temperature": 0.7, "max_new_tokens": 9, "do_sample": True}
    assert cut(" a b Q: c\n\nd ", ["\n\n", "Q:"]) == "a b"


def test_a_continuation_of_several_tokens_is_scored_step_by_step():
    from headgain.eval.lmms import HeadGainLMM
    from headgain.eval.sample import Sample

    lm = HeadGainLMM(pretrained="toy", cfg="none", device="cpu")
    row = _rows()[0]
    loss, greedy = lm._score(Sample(id="0", images=[row["image"]], question=row["question"]), " yes .")
    # vanilla: the same as one forward pass over the prompt and the continuation
    model, processor = _toy(None)
    text = chat_prompt(processor, row["question"]) + " yes ."
    inputs = processor(images=[row["image"]], text=[text], return_tensors="pt")
    forced = processor.tokenizer.convert_tokens_to_ids(["yes", "."])
    with torch.no_grad():
        logprobs = model(**inputs).logits[0, -3:-1].log_softmax(-1)
    assert loss == pytest.approx(-(logprobs[0, forced[0]] + logprobs[1, forced[1]]).item() / 2, abs=1e-4)
    assert greedy == (logprobs.argmax(-1).tolist() == forced)
