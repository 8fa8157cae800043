"""headgain.eval.datasets: every format and benchmark adapter, on files the tests write."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from headgain.eval.datasets import DataError, detect_format, load
from headgain.eval.images import LazyImages
from headgain.testing.synthetic import draw_image

try:
    import datasets
except ImportError:  # the eval extra: pip install 'headgain[eval]' (make test installs it)
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="needs the datasets library: pip install 'headgain[eval]'")


def _b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _same(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _write_tsv(path, header, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(r.get(h, "")) for h in header) + "\n")


# ---------------------------------------------------------------------- VLMEvalKit TSV
def test_tsv_mmstar_options_images_categories(tmp_path):
    imgs = [draw_image(size=(40, 30), seed=i) for i in range(3)]
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [
        dict(
            index=10,
            question="Which?",
            A="cat",
            B="dog",
            C="cow",
            D="ant",
            answer="C",
            category="coarse",
            image=_b64(imgs[0]),
            **{"l2-category": "image style"},
        ),
        dict(
            index=11,
            question="Where?",
            A="left",
            B="right",
            C="",
            D="",
            answer="B",
            category="fine",
            image=_b64(imgs[1]),
        ),
        dict(
            index=12,
            question="Two?",
            A="x",
            B="y",
            C="z",
            D="w",
            answer="A",
            category="fine",
            image=str([_b64(imgs[1]), _b64(imgs[2])]),
        ),
    ]
    path = tmp_path / "MMStar.tsv"
    _write_tsv(path, header, rows)
    samples = list(load(str(path)))
    assert [s.id for s in samples] == ["10", "11", "12"]
    assert samples[0].options == {"A": "cat", "B": "dog", "C": "cow", "D": "ant"}
    assert samples[1].options == {"A": "left", "B": "right"}  # blank option columns end the list
    assert [s.answer for s in samples] == ["C", "B", "A"]
    assert all(s.answer_type == "choice" for s in samples)
    assert [s.category for s in samples] == ["coarse", "fine", "fine"]
    assert samples[0].meta["benchmark"] == "mmstar" and samples[0].meta["l2_category"] == "image style"
    assert _same(samples[0].images[0], imgs[0]) and len(samples[0].images) == 1
    assert isinstance(samples[0].images, LazyImages)  # kept compressed, decoded on each access
    assert samples[0].images[0] is not samples[0].images[0] and samples[0].images[0].mode == "RGB"
    assert len(samples[2].images) == 2 and _same(samples[2].images[1], imgs[2])


def test_tsv_hallusionbench_shared_figure_and_missing_image(tmp_path):
    fig = draw_image(size=(32, 32), seed=5)
    header = ["index", "category", "l2-category", "set_id", "figure_id", "question_id", "question", "answer", "image"]
    rows = [
        dict(
            index=0,
            category="VD",
            **{"l2-category": "chart"},
            set_id=1,
            figure_id=0,
            question_id=0,
            question="Is the bar red?",
            answer="Yes",
            image=_b64(fig),
        ),
        dict(
            index=1,
            category="VD",
            **{"l2-category": "chart"},
            set_id=1,
            figure_id=0,
            question_id=1,
            question="Is it tall?",
            answer="No",
            image="0",
        ),  # VLMEvalKit: the image of row index 0
        dict(
            index=2,
            category="VS",
            **{"l2-category": "map"},
            set_id=2,
            figure_id=0,
            question_id=0,
            question="Is Paris in France?",
            answer="1",
            image="",
        ),
    ]
    path = tmp_path / "HallusionBench.tsv"
    _write_tsv(path, header, rows)
    samples = list(load(str(path)))
    assert [s.answer for s in samples] == ["yes", "no", "yes"]
    assert all(s.answer_type == "yes_no" for s in samples)
    assert _same(samples[1].images[0], fig)  # the reference resolved
    assert len(samples[2].images) == 0
    assert samples[1].meta["subcategory"] == "chart" and samples[1].meta["question_id"] == "1"
    assert samples[0].meta["benchmark"] == "hallusionbench"


def test_tsv_mathvista_choices_and_precision(tmp_path):
    header = ["index", "question", "answer", "question_type", "answer_type", "precision", "choices", "task", "image"]
    img = _b64(draw_image(size=(28, 28)))
    rows = [
        dict(
            index=1,
            question="Pick",
            answer="3/11",
            question_type="multi_choice",
            answer_type="text",
            precision="",
            choices=str(["8/11", "3/11"]),
            task="figure QA",
            image=img,
        ),
        dict(
            index=2,
            question="Length?",
            answer="1.25",
            question_type="free_form",
            answer_type="float",
            precision="2.0",
            choices="",
            task="geometry",
            image=img,
        ),
        dict(
            index=3,
            question="Count?",
            answer="7",
            question_type="free_form",
            answer_type="integer",
            precision="",
            choices="",
            task="geometry",
            image=img,
        ),
    ]
    path = tmp_path / "bench.tsv"
    _write_tsv(path, header, rows)
    a, b, c = load(str(path))
    assert (a.answer_type, a.answer, a.options) == ("choice", "B", {"A": "8/11", "B": "3/11"})
    assert (b.answer_type, b.meta["precision"], c.meta["precision"]) == ("number", 2, 0)
    assert a.meta["benchmark"] == "mathvista" and b.category == "geometry"


# ---------------------------------------------------------------------- Hugging Face folders and parquet
def _image_features(**columns):
    return datasets.Features(columns)


@needs_datasets
def test_hf_folder_mathvista_splits(tmp_path):
    img = draw_image(size=(30, 20), seed=2)
    feats = _image_features(
        pid=datasets.Value("string"),
        question=datasets.Value("string"),
        image=datasets.Value("string"),
        decoded_image=datasets.Image(),
        choices=datasets.Sequence(datasets.Value("string")),
        unit=datasets.Value("string"),
        precision=datasets.Value("float32"),
        answer=datasets.Value("string"),
        question_type=datasets.Value("string"),
        answer_type=datasets.Value("string"),
        metadata={"task": datasets.Value("string"), "source": datasets.Value("string")},
    )
    rows = dict(
        pid=["1", "2"],
        question=["Which is larger?", "What is x?"],
        image=["images/1.jpg", "images/2.jpg"],
        decoded_image=[img, img],
        choices=[["small", "large"], None],
        unit=[None, "cm"],
        precision=[None, 1.0],
        answer=["large", "2.5"],
        question_type=["multi_choice", "free_form"],
        answer_type=["text", "float"],
        metadata=[{"task": "figure QA", "source": "a"}, {"task": "geometry", "source": "b"}],
    )
    ds = datasets.DatasetDict(
        {
            "testmini": datasets.Dataset.from_dict(rows, features=feats),
            "test": datasets.Dataset.from_dict(rows, features=feats),
        }
    )
    ds.save_to_disk(str(tmp_path / "MathVista"))
    assert detect_format(str(tmp_path / "MathVista")) == "hf"
    with pytest.raises(DataError, match="testmini") as err:
        load(str(tmp_path / "MathVista"))
    assert "split" in str(err.value)
    with pytest.raises(DataError, match="no split 'val'"):
        load(str(tmp_path / "MathVista"), split="val")
    first, second = load(str(tmp_path / "MathVista"), split="testmini")
    assert (first.answer_type, first.answer, first.category) == ("choice", "B", "figure QA")
    assert (second.answer_type, second.meta["precision"], second.meta["unit"]) == ("number", 1, "cm")
    assert _same(first.images[0], img)


@needs_datasets
def test_hf_folder_mathvision(tmp_path):
    img = draw_image(size=(24, 24), seed=3)
    feats = _image_features(
        id=datasets.Value("string"),
        question=datasets.Value("string"),
        options=datasets.Sequence(datasets.Value("string")),
        image=datasets.Value("string"),
        decoded_image=datasets.Image(),
        answer=datasets.Value("string"),
        solution=datasets.Value("string"),
        level=datasets.Value("int64"),
        subject=datasets.Value("string"),
    )
    ds = datasets.Dataset.from_dict(
        dict(
            id=["1", "2", "3"],
            question=["Which?", "How many?", "Ratio?"],
            options=[["1", "2", "3", "4", "5"], [], []],
            image=["a.png"] * 3,
            decoded_image=[img] * 3,
            answer=["D", "12", "\\frac{1}{2}"],
            solution=[""] * 3,
            level=[1, 2, 3],
            subject=["counting", "metric geometry", "algebra"],
        ),
        features=feats,
    )
    ds.save_to_disk(str(tmp_path / "mv"))
    a, b, c = load(str(tmp_path / "mv"))
    assert a.meta["benchmark"] == "mathvision"
    assert (a.answer_type, a.answer, list(a.options)) == ("choice", "D", list("ABCDE"))
    assert (b.answer_type, c.answer_type, c.category, c.meta["level"]) == ("number", "number", "algebra", 3)


@needs_datasets
def test_parquet_mmstar_seedbench_pope(tmp_path):
    img = draw_image(size=(26, 22), seed=4)
    mm = datasets.Dataset.from_dict(
        dict(
            index=[0, 1],
            question=[
                "Which option is right?\nOptions: A: a red ball, B: a blue box, C: two cats, D: none",
                "What is shown?\nOptions: A: x, B: y, C: z, D: w",
            ],
            image=[img, img],
            answer=["B", "D"],
            category=["coarse perception", "math"],
            l2_category=["image style", "numeric"],
            meta_info=[{"source": "s"}, {"source": "t"}],
        ),
        features=_image_features(
            index=datasets.Value("int64"),
            question=datasets.Value("string"),
            image=datasets.Image(),
            answer=datasets.Value("string"),
            category=datasets.Value("string"),
            l2_category=datasets.Value("string"),
            meta_info={"source": datasets.Value("string")},
        ),
    )
    (tmp_path / "mmstar" / "mmstar").mkdir(parents=True)
    mm.to_parquet(str(tmp_path / "mmstar" / "mmstar" / "val-00000-of-00001.parquet"))
    a, b = load(str(tmp_path / "mmstar"))
    assert a.meta["benchmark"] == "mmstar"
    assert a.question == "Which option is right?"
    assert a.options == {"A": "a red ball", "B": "a blue box", "C": "two cats", "D": "none"}
    assert (a.answer, b.answer, b.category) == ("B", "D", "math")
    assert _same(a.images[0], img)

    seed = datasets.Dataset.from_dict(
        dict(
            question=["What is the man doing?"],
            choice_a=["run"],
            choice_b=["sit"],
            choice_c=["swim"],
            choice_d=["eat"],
            answer=["C"],
            question_id=["q7"],
            question_type_id=[5],
            data_type=["image"],
            image=[[img]],
        ),
        features=_image_features(
            question=datasets.Value("string"),
            choice_a=datasets.Value("string"),
            choice_b=datasets.Value("string"),
            choice_c=datasets.Value("string"),
            choice_d=datasets.Value("string"),
            answer=datasets.Value("string"),
            question_id=datasets.Value("string"),
            question_type_id=datasets.Value("int64"),
            data_type=datasets.Value("string"),
            image=datasets.Sequence(datasets.Image()),
        ),
    )
    seed.to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    (s,) = load(str(tmp_path / "test-00000-of-00001.parquet"))
    assert s.meta["benchmark"] == "seedbench" and s.id == "q7"
    assert (s.options, s.answer, s.category) == (
        {"A": "run", "B": "sit", "C": "swim", "D": "eat"},
        "C",
        "Instances Counting",
    )

    pope_dir = tmp_path / "pope_data"
    pope_dir.mkdir()
    for split, answers in (("test", ["yes", "no", "no"]), ("train", ["yes"])):
        pope = datasets.Dataset.from_dict(
            dict(
                id=[str(i) for i in range(len(answers))],
                question_id=[f"{split}{i}" for i in range(len(answers))],
                question=["Is there a dog in the image?"] * len(answers),
                answer=answers,
                image_source=["coco"] * len(answers),
                image=[img] * len(answers),
                category=["adversarial", "popular", "random"][: len(answers)],
            ),
            features=_image_features(
                id=datasets.Value("string"),
                question_id=datasets.Value("string"),
                question=datasets.Value("string"),
                answer=datasets.Value("string"),
                image_source=datasets.Value("string"),
                image=datasets.Image(),
                category=datasets.Value("string"),
            ),
        )
        pope.to_parquet(str(pope_dir / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="several splits"):
        load(str(pope_dir))
    samples = list(load(str(pope_dir), split="test"))
    assert [s.answer for s in samples] == ["yes", "no", "no"] and samples[0].meta["benchmark"] == "pope"
    assert [s.category for s in samples] == ["adversarial", "popular", "random"]


# ---------------------------------------------------------------------- JSONL
def test_jsonl_relative_images_and_types(tmp_path):
    (tmp_path / "img").mkdir()
    imgs = [draw_image(size=(20, 20), seed=i) for i in range(2)]
    for i, im in enumerate(imgs):
        im.save(tmp_path / "img" / f"{i}.png")
    lines = [
        {"id": "a", "image": "img/0.png", "question": "Colour?", "options": ["red", "blue"], "answer": "blue"},
        {"id": "b", "images": ["img/0.png", "img/1.png"], "question": "Same?", "answer": "No", "category": "pair"},
        {"id": "c", "image": "img/1.png", "question": "Count?", "answer": "1,024"},
        {
            "id": "d",
            "image": "img/1.png",
            "question": "Describe.",
            "answer": "",
            "answer_type": "text",
            "objects": ["dog", "person"],
        },
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b, c, d = load(str(path))
    assert (a.answer_type, a.answer, a.options) == ("choice", "B", {"A": "red", "B": "blue"})
    assert (b.answer_type, b.answer, b.category) == ("yes_no", "no", "pair")
    assert _same(b.images[0], imgs[0]) and _same(b.images[1], imgs[1])
    assert (c.answer_type, c.answer) == ("number", "1,024")
    assert d.meta["objects"] == ["dog", "person"] and d.answer_type == "text"
    split = tmp_path / "split.jsonl"
    split.write_text("".join(json.dumps(dict(x, split="dev" if i < 2 else "test")) + "\n" for i, x in enumerate(lines)))
    assert [s.id for s in load(str(split), split="dev")] == ["a", "b"]
    assert [s.id for s in load(str(split), split="test")] == ["c", "d"]
    with pytest.raises(DataError, match="no rows of split 'val'; splits found: dev, test"):
        load(str(split), split="val")


# ---------------------------------------------------------------------- errors
def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load(str(tmp_path / "nothing.tsv"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="VLMEvalKit TSV") as err:
        load(str(tmp_path / "x.csv"))
    assert "JSONL" in str(err.value) and "parquet" in str(err.value)
    _write_tsv(tmp_path / "noanswer.tsv", ["index", "question", "image"], [dict(index=0, question="q", image="")])
    with pytest.raises(DataError, match="'answer'") as err:
        load(str(tmp_path / "noanswer.tsv"))
    assert "columns found: index, question, image" in str(err.value) and "headgain reads" in str(err.value)
    _write_tsv(
        tmp_path / "hb.tsv",
        ["index", "set_id", "figure_id", "question", "answer"],
        [dict(index=0, set_id=1, figure_id=0, question="q", answer="yes")],
    )
    with pytest.raises(DataError, match="'question_id' missing for the hallusionbench adapter"):
        load(str(tmp_path / "hb.tsv"), benchmark="hallusionbench")
    _write_tsv(
        tmp_path / "bad.tsv",
        ["index", "question", "A", "B", "answer"],
        [dict(index=0, question="q", A="x", B="y", answer="E")],
    )
    with pytest.raises(DataError, match="'E' is not one of the options"):
        list(load(str(tmp_path / "bad.tsv")))
    _write_tsv(
        tmp_path / "corrupt.tsv",
        ["index", "question", "answer", "image"],
        [dict(index=0, question="q", answer="yes", image="bm90IGFuIGltYWdl" * 8)],  # base64 of text
    )
    with pytest.raises(DataError, match="corrupt.tsv row 0: not an image"):
        list(load(str(tmp_path / "corrupt.tsv")))
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "question": "q", "answer": "yes"}\n' * 2)
    with pytest.raises(DataError, match="appears twice"):
        list(load(str(tmp_path / "dup.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"id": 1, "question": "q"\n')
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        load(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DataError, match="unknown benchmark 'mme'"):
        load(str(tmp_path / "dup.jsonl"), benchmark="mme")
    (tmp_path / "split.jsonl").write_text('{"id": 1, "question": "q", "answer": "yes"}\n')
    with pytest.raises(DataError, match="no 'split' column"):
        load(str(tmp_path / "split.jsonl"), split="test")
