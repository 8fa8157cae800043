"""The overhead benchmark's code paths at tiny sizes (one round; no timing is asserted)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    results = tmp / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Ops benchmark\n\nkept as is\n")
    out = tmp / "out.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "overhead.py"),
        "--visual-tokens",
        "16",
        "--batch",
        "2",
        "--new-tokens",
        "2",
        "--rounds",
        "1",
        "--json",
        str(out),
        "--results",
        str(results),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), results.read_text()


def test_json_has_every_arm_and_setting(run):
    _, data, _ = run
    assert [e["visual_tokens"] for e in data["results"]] == [16]
    for entry in data["results"]:
        assert set(entry["arms"]) == {"vanilla-sdpa", "headgain-sdpa", "vanilla-eager", "headgain-eager", "vcd-sdpa"}
        for arm, a in entry["arms"].items():
            assert len(a["times_s"]) == 1 and a["median_s"] > 0 and a["tokens_per_s"] > 0
            assert a["peak_mib"] > 0
            if not arm.startswith("vanilla"):
                assert "change_pct" in a
    assert data["machine"]["torch"] and data["machine"]["transformers"] and data["command"].startswith("python")
    assert len(data["targets"]["per_setting"]) == 1


def test_table_and_results_entry(run):
    proc, _, md = run
    assert "| VCD (sdpa) |" in proc.stdout and "Seconds per batch" in proc.stdout
    # the entry lands in this benchmark's own section; other sections are kept
    assert "## Ops benchmark\n\nkept as is\n" in md
    section = md[md.index("## Overhead benchmark (benchmarks/overhead.py)") :]
    assert "- Command: `python benchmarks/overhead.py --visual-tokens 16" in section
    assert "transformers" in section and "| headgain (eager) |" in section


def test_record_appends_inside_its_section(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks.common import record
    from benchmarks.overhead import SECTION

    path = tmp_path / "R.md"
    path.write_text(f"# R\n\n{SECTION}\n\nold entry\n\n## Ops benchmark\n\nops\n")
    record(str(path), SECTION, "new entry")
    text = path.read_text()
    assert text.index("old entry") < text.index("new entry") < text.index("## Ops benchmark")
    assert text.endswith("## Ops benchmark\n\nops\n")


def test_ops_section_is_replaced_in_place(tmp_path):
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.ops import SECTIONS, write_section

    section = SECTIONS["cpu"]
    path = tmp_path / "R.md"
    path.write_text(f"# R\n\n{section}\n\nold table\n\n## Overhead\n\nkept\n")
    row = {"device": "cpu", "op": "head_gains", "shape": "B=1", "ref": 2.0, "fused": 0.5, "floor": 0.25}
    write_section([row], "python benchmarks/ops.py", torch.bfloat16, path)
    text = path.read_text()
    assert "old table" not in text and "| cpu | head_gains | B=1 | 2.000 | 0.500 | 4.0x | 0.250 | 2.0 |" in text
    assert text.endswith("| 2.0 |\n\n## Overhead\n\nkept\n")
    # dated subsections of the section (figures entered by hand) stay
    path.write_text(f"# R\n\n{section}\n\nold table\n\n### 2026-11-29: by hand\n\nnotes\n\n## Overhead\n\nkept\n")
    write_section([row], "python benchmarks/ops.py", torch.bfloat16, path)
    text = path.read_text()
    assert "old table" not in text
    assert text.endswith("| 2.0 |\n\n### 2026-11-29: by hand\n\nnotes\n\n## Overhead\n\nkept\n")


def test_ops_sections_per_device(tmp_path):
    """A CUDA run (make gpu-check) writes its own section and leaves the CPU table alone; a run
    over both devices replaces both sections, each with its own rows."""
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.ops import SECTIONS, write_section

    path = tmp_path / "R.md"
    path.write_text(f"# R\n\n{SECTIONS['cpu']}\n\ncpu table\n\n## Overhead\n\nkept\n")
    cpu = {"device": "cpu", "op": "head_gains", "shape": "B=1", "ref": 2.0, "fused": 0.5, "floor": 0.25}
    cuda = dict(cpu, device="cuda", ref=0.1, fused=0.05)
    write_section([cuda], "python benchmarks/ops.py --device cuda", torch.bfloat16, path)
    text = path.read_text()
    assert text.index("cpu table") < text.index("## Overhead") < text.index(SECTIONS["cuda"])
    assert text.endswith("| cuda | head_gains | B=1 | 0.100 | 0.050 | 2.0x | 0.250 | 0.2 |\n")
    write_section([cpu, cuda], "python benchmarks/ops.py", torch.bfloat16, path)
    text = path.read_text()
    assert "cpu table" not in text and text.count("| head_gains |") == 2
    cpu_part = text[text.index(SECTIONS["cpu"]) : text.index("## Overhead")]
    cuda_part = text[text.index(SECTIONS["cuda"]) :]
    assert "| cpu | head_gains |" in cpu_part and "| cuda |" not in cpu_part
    assert "| cuda | head_gains |" in cuda_part and "| cpu |" not in cuda_part


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "overhead.py"),
        "--model",
        str(tmp_path / "nope"),
        "--no-record",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0 and "no such local checkpoint" in proc.stderr


@pytest.mark.parametrize("cache, attach", [("dynamic", "once"), ("static", "per-call")])
def test_scaling_mode(tmp_path, cache, attach):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Ops benchmark\n\nkept as is\n")
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    args = ["--batches", "1,2", "--visual-tokens", "8", "--reasoning", "0,4", "--rounds", "1", "--steps", "1"]
    args += ["--prefill-limit", "60", "--json", str(out), "--plot", str(png), "--results", str(results)]
    args += ["--cache", cache, "--attach", attach]
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "overhead.py"), "--scaling", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    points = [(e["batch"], e["reasoning"], e["context"]) for e in data["results"]]
    assert points == [(1, 0, 40), (2, 0, 40), (1, 4, 44), (2, 4, 44)]
    for e in data["results"]:
        assert set(e["arms"]) == {"vanilla-sdpa", "headgain-fused", "headgain-unfused"}
        assert all(a["decode_ms"] > 0 for a in e["arms"].values())
        timed_prefill = e["batch"] * e["context"] <= 60
        assert (e["arms"]["headgain-fused"]["prefill_change"] is not None) == timed_prefill
    assert png.stat().st_size > 1000
    md = results.read_text()
    assert "## Decoding-step scaling (benchmarks/overhead.py --scaling)" in md and "| 2 | 8 | 4 | 44 |" in md
    assert f"Decoding step ({cache} cache)" in md
    assert ("attached once to a copy of the model" if attach == "once" else "attached around each call") in md


def test_scaling_runner_attaches_once_to_a_copy():
    """With --attach once the headgain arms decode on an attached copy of the model (its own
    cache, filled as the vanilla one), the fused and unfused arms switching handle.fused; the
    model itself stays vanilla."""
    import headgain
    from benchmarks import common, scaling

    shape = common.SHAPES["cpu-default"]
    model = common.build_model(dataclasses.replace(shape, text={**shape.text, "num_hidden_layers": 8}), "sdpa")
    runner = scaling.Runner(model, "ocean-r1-7b", "once")
    assert headgain.handle_of(model) is None and headgain.handle_of(runner.copy) is runner.handle
    points = runner.points(2, 8, 0, "static")
    plain, held = points["vanilla-sdpa"], points["headgain-fused"]
    assert held is points["headgain-unfused"] and held is not plain
    assert torch.equal(plain.cache.layers[0].keys, held.cache.layers[0].keys)
    for arm in scaling.ARMS:
        assert runner.decode(points, arm) > 0 and runner.prefill(points, arm) > 0
        assert runner.handle.fused == (arm == "headgain-fused") or arm == "vanilla-sdpa"
        for point in (plain, held):
            assert int(point.cache.get_seq_length()) == point.context


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_scaling_point_keeps_its_context(cache):
    """Every timed step of the scaling benchmark sees the point's context: the step's token is
    dropped again, and the logits of repeated steps agree."""
    from benchmarks import common, scaling

    shape = common.SHAPES["cpu-default"]
    model = common.build_model(dataclasses.replace(shape, text={**shape.text, "num_hidden_layers": 8}), "sdpa")
    point = scaling.Point(model, 2, 8, 0, model.device, model.dtype, cache)
    logits = []
    for arm in scaling.ARMS:
        assert scaling.decode_time(model, point, arm, "ocean-r1-7b") > 0
        assert int(point.cache.get_seq_length()) == point.context
        with torch.no_grad():
            logits.append(model(**point.step).logits)
        point.rewind()
    assert int(point.cache.get_seq_length()) == point.context
    torch.testing.assert_close(logits[0], logits[1])


def test_gpu_check_refuses_a_machine_without_a_cuda_gpu(tmp_path):
    if torch_has_cuda():
        pytest.skip("a CUDA GPU is visible: make gpu-check runs for real there")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert "gpu-check needs a CUDA GPU and a CUDA build of torch" in proc.stderr + proc.stdout
    # the reason is also in the summary that comes back from the GPU machine
    assert "gpu-check needs a CUDA GPU" in (tmp_path / "summary.txt").read_text()


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_prefill_instructions_points_and_child(tmp_path):
    """The callgrind benchmark refuses a bad point, and its counted child runs (outside
    valgrind the client requests do nothing)."""
    script = os.path.join(ROOT, "benchmarks", "prefill_instructions.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad = subprocess.run([sys.executable, script, "--points", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "expected BATCHxVISUAL" in bad.stderr
    if shutil.which("gcc") is None or not os.path.exists("/usr/include/valgrind/callgrind.h"):
        pytest.skip("gcc and valgrind's headers build the counting helper")
    from benchmarks.prefill_instructions import build_helper

    helper = build_helper(str(tmp_path))
    cmd = [sys.executable, script, "--helper", helper, "--child", "headgain", "1", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
