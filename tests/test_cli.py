"""The headgain command on the embedded toy model: every subcommand, and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import headgain
from headgain.cli import main
from headgain.testing.synthetic import draw_image
from headgain.toy.model import TOY

L, H = TOY["layers"], TOY["heads"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _quiet():
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    assert torch.get_num_threads() == threads  # the command restores the thread count


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        draw_image(seed=i).save(images / f"im{i}.png")
    with open(root / "questions.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"image": f"im{i}.png", "question": f"What is in picture {i}?"}) + "\n")
    (root / "notimage.png").write_text("this is not a picture")
    (root / "bad.json").write_text("{not json")
    headgain.HeadGainConfig(l_perc=3, l_reas=4, tau_perc=0.3, tau_reas=0.2).to_json(str(root / "cfg.json"))
    return root


def _png(path):
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and min(img.size) > 100
        return img.size


def test_run(data, capsys):
    rc = main(
        ["run", "--image", str(data / "images" / "im0.png"), "--question", "What is red?", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "embedded toy Qwen2.5-VL" in out and "preset ocean-r1-7b" in out
    assert "vanilla  (" in out and "rescaled (" in out and " s, " in out
    assert "selected heads at the prompt's last token" in out and "total: " in out


def test_run_with_an_arch_map_file(data, tmp_path, capsys):
    path = tmp_path / "map.json"
    headgain.ArchMap("model.language_model.layers.*.self_attn", visual_token_ids=("image_token_id",)).to_json(str(path))
    rc = main(
        [
            "run",
            "--image",
            str(data / "images" / "im0.png"),
            "--question",
            "What is red?",
            "--max-new-tokens",
            "2",
            "--arch-map",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "selected heads" in out, out


def test_run_with_config_and_eager(data, capsys):
    rc = main(
        [
            "run",
            "--image",
            str(data / "images" / "im1.png"),
            "--question",
            "Q?",
            "--max-new-tokens",
            "2",
            "--config",
            str(data / "cfg.json"),
            "--attn",
            "eager",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "l_perc=3 tau_perc=0.3" in out


def test_census(data, tmp_path, capsys):
    out_dir = tmp_path / "census"
    rc = main(
        [
            "census",
            "--images",
            str(data / "images"),
            "--questions",
            str(data / "questions.jsonl"),
            "--out",
            str(out_dir),
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads((out_dir / "census.json").read_text())
    assert d["num_samples"] == 3 and d["num_layers"] == L and d["num_heads"] == H
    for key in ("mean", "std", "selected_fraction", "classes"):
        assert np.array(d[key]).shape == (L, H), key
    assert np.load(out_dir / "samples.npy").shape == (3, L, H)
    suggested = headgain.HeadGainConfig.from_json(str(out_dir / "suggested_config.json"))
    suggested.check_layers(8)
    for name in ("visual_ratio.png", "classes.png", "classes_suggested.png"):
        _png(out_dir / name)
    assert "suggested config:" in out and "wrote" in out


def test_census_folder_without_questions(data, tmp_path, capsys):
    rc = main(["census", "--images", str(data / "images"), "--out", str(tmp_path / "c"), "--limit", "2"])
    assert rc == 0
    assert json.loads((tmp_path / "c" / "census.json").read_text())["num_samples"] == 2


def test_contrib(data, tmp_path, capsys):
    out_dir = tmp_path / "contrib"
    rc = main(
        [
            "contrib",
            "--image",
            str(data / "images" / "im0.png"),
            "--question",
            "What is red?",
            "--answer",
            "red",
            "--out",
            str(out_dir),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("contrib_vanilla.png", "contrib_rescaled.png", "contrib_compare.png"):
        _png(out_dir / name)
    d = json.loads((out_dir / "contrib.json").read_text())
    assert d["answer"] == "red" and len(d["answer_ids"]) == 1  # one word, one token
    for key in ("vanilla", "rescaled"):
        assert np.array(d[key]["signed"]).shape == (L, H)
        assert np.array(d[key]["importance"]).sum(1) == pytest.approx(np.ones(L), abs=1e-5)
        assert len(d[key]["ranking"]) == L * H
    assert d["rescaled"]["cfg"]["l_perc"] == 7 and d["vanilla"]["cfg"] is None
    assert "top heads, vanilla:" in out


def test_contrib_greedy_global_signed(data, tmp_path, capsys):
    rc = main(
        [
            "contrib",
            "--image",
            str(data / "images" / "im1.png"),
            "--question",
            "Q?",
            "--max-new-tokens",
            "2",
            "--normalize",
            "global",
            "--signed",
            "--preset",
            "r1-onevision",
            "--out",
            str(tmp_path / "g"),
        ]
    )
    assert rc == 0
    d = json.loads((tmp_path / "g" / "contrib.json").read_text())
    assert 1 <= len(d["answer_ids"]) <= 2 and d["vanilla"]["normalize"] == "global"
    assert sum(map(sum, d["vanilla"]["importance"])) == pytest.approx(1.0, abs=1e-5)
    assert "vanilla greedy continuation" in capsys.readouterr().out


def test_python_dash_m(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "headgain",
            "contrib",
            "--image",
            str(data / "images" / "im2.png"),
            "--question",
            "Q?",
            "--answer",
            "ok",
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _png(tmp_path / "m" / "contrib_compare.png")


def _bad(capsys, argv, message):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("headgain: error: ") and message in lines[0], lines[0]


def test_bad_inputs(data, tmp_path, capsys):
    img = str(data / "images" / "im0.png")
    _bad(capsys, ["run", "--image", str(tmp_path / "nope.png"), "--question", "Q"], "image file not found")
    _bad(capsys, ["run", "--image", str(data / "notimage.png"), "--question", "Q"], "not an image file")
    _bad(capsys, ["run", "--image", str(data / "images"), "--question", "Q"], "is a folder")
    _bad(capsys, ["run", "--image", img, "--question", "Q", "--preset", "gpt-9"], "unknown preset 'gpt-9'")
    _bad(capsys, ["run", "--image", img, "--question", "Q", "--config", str(data / "bad.json")], "not valid JSON")
    _bad(
        capsys,
        ["run", "--image", img, "--question", "Q", "--config", str(tmp_path / "x.json")],
        "config file not found",
    )
    _bad(
        capsys,
        ["run", "--image", img, "--question", "Q", "--preset", "ocean-r1-7b", "--config", str(data / "cfg.json")],
        "not both",
    )
    _bad(capsys, ["run", "--image", img, "--question", "Q", "--model", str(tmp_path / "ckpt")], "model path not found")
    _bad(capsys, ["contrib", "--image", str(data / "notimage.png"), "--question", "Q"], "not an image file")
    _bad(capsys, ["census", "--images", str(tmp_path / "none")], "images folder not found")
    _bad(
        capsys,
        ["census", "--images", str(data / "images"), "--questions", str(tmp_path / "q.jsonl")],
        "questions file not found",
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "im0.png", "question": "ok"}\n{oops\n')
    _bad(capsys, ["census", "--images", str(data / "images"), "--questions", str(broken)], "line 2: not valid JSON")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"image": "gone.png", "question": "ok"}\n')
    _bad(capsys, ["census", "--images", str(data / "images"), "--questions", str(missing)], "image file not found")
    _bad(capsys, ["run", "--image", img, "--question", "  "], "--question is empty")
    _bad(capsys, ["contrib", "--image", img, "--question", ""], "--question is empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"image": "im0.png", "question": " "}\n')
    _bad(
        capsys, ["census", "--images", str(data / "images"), "--questions", str(blank)], "line 1: the question is empty"
    )
    _bad(
        capsys,
        ["run", "--image", img, "--question", "Q", "--arch-map", str(tmp_path / "a.json")],
        "arch map file not found",
    )
    (tmp_path / "bad_map.json").write_text('{"attention": "model.layers.self_attn"}')
    _bad(
        capsys,
        ["run", "--image", img, "--question", "Q", "--arch-map", str(tmp_path / "bad_map.json")],
        "exactly one '*'",
    )
    (tmp_path / "wrong_map.json").write_text('{"attention": "model.decoder.layers.*.attn"}')
    _bad(
        capsys,
        ["run", "--image", img, "--question", "Q", "--arch-map", str(tmp_path / "wrong_map.json")],
        "matches no module",
    )
    small = tmp_path / "small.json"
    headgain.HeadGainConfig(l_perc=20, l_reas=3).to_json(str(small))
    _bad(capsys, ["run", "--image", img, "--question", "Q", "--config", str(small)], "outside the model")


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["run", "--question", "Q"]) == 2  # --image missing
    assert main(["run", "--image", "a.png", "--question", "Q", "--attn", "flash"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()
