"""The demo behind `make demo` runs end to end and prints one summary row per decoder layer."""

import re

from headgain.demo import main
from headgain.testing.tiny import EMBEDDED


def test_demo_prints_both_answers_and_every_layer(capsys):
    main(["--new-tokens", "2"])
    out = capsys.readouterr().out
    assert "vanilla :" in out and "headgain:" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d\.\d{3}\s", line)]
    assert [int(r.split()[0]) for r in rows] == list(range(EMBEDDED["layers"]))
    assert re.search(rf"selected \d+ of {EMBEDDED['layers'] * EMBEDDED['heads']} heads", out)
