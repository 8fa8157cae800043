"""The demo behind `make demo` runs end to end on the toy model: it saves the picture,
answers in words and prints one head-map row per decoder layer."""

import re

from PIL import Image

from headgain.demo import main
from headgain.toy.model import TOY


def test_demo_prints_both_answers_and_every_layer(capsys, tmp_path):
    picture = tmp_path / "scene.png"
    main(["--image", str(picture)])
    out = capsys.readouterr().out
    with Image.open(picture) as img:
        assert img.size == (112, 112)
    vanilla = re.search(r"^vanilla : '(.*)'", out, re.M).group(1)
    rescaled = re.search(r"^headgain: '(.*)'", out, re.M).group(1)
    assert vanilla in {"yes", "no"} and rescaled  # a real answer, in words
    rows = [line for line in out.splitlines() if re.match(rf"^\s+\d+\s+[PR.]{{{TOY['heads']}}}\s+\d\.\d{{3}}", line)]
    assert [int(r.split()[0]) for r in rows] == list(range(TOY["layers"]))
    assert re.search(rf"selected \d+ of {TOY['layers'] * TOY['heads']} heads", out)
