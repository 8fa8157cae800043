"""The vLLM plugin's per-step plan of the requests read at i* (`_RowBatch.build`; no vLLM
needed: the requests and their slots in a packed batch are made here), checked against
indices written out by hand, and on a GPU built without the CPU waiting for it."""

import pytest
import torch
from support import DEVICES

from headgain.core.config import HeadGainConfig
from headgain.vllm import attachment
from headgain.vllm.attachment import _RowBatch, _Slot
from headgain.vllm.requests import RequestState

LAST = HeadGainConfig.from_preset("ocean-r1-7b")
MEAN = LAST.replace(query="mean_text")


def _slot(req_id, cfg, rules, row, start, end, past, device):
    """A request of ``past`` computed tokens with rows [start, end) of the packed batch and
    row ``row`` of the block table; its visual flags are a pattern of its length."""
    request = RequestState(req_id, cfg, rules=rules)
    n = past + end - start
    request.add_visual((torch.arange(n, device=device) % 3 == 0) & (n > 2))
    return _Slot(request, row, start, end, past, request.visual[past:n])


def _step(device):
    """A packed batch of 12 rows: decoding requests a, b (config A); a prompt p of rows 2..5
    read at its last row (config B); rows 6, 7 of a request without a config (no slot); a
    prompt m of rows 8..10 read at its text rows (query mean_text: not in the batch); a
    decoding request c at row 11 (config A)."""
    rules_a, rules_b = ("A",), ("B",)
    return [
        _slot("a", LAST, rules_a, 0, 0, 1, 7, device),
        _slot("b", LAST, rules_a, 1, 1, 2, 4, device),
        _slot("p", LAST, rules_b, 2, 2, 6, 0, device),
        _slot("m", MEAN, rules_b, 4, 8, 11, 0, device),
        _slot("c", LAST, rules_a, 5, 11, 12, 9, device),
    ]


def _lists(batch: _RowBatch) -> dict:
    runs = None
    if batch.runs is not None:
        runs = [(a, b, (s.start, s.stop) if isinstance(s, slice) else s.tolist()) for a, b, s in batch.runs]
    return {
        "slots": [s.request.req_id for s in batch.slots],
        "others": [s.request.req_id for s in batch.others],
        "last": batch.last.tolist(),
        "rows": batch.rows.tolist(),
        "lengths": batch.lengths.tolist(),
        "in_order": batch.in_order,
        "groups": [(rules, pos.tolist(), hv.tolist()) for rules, pos, hv in batch.groups],
        "runs": runs,
        "tokens": None if batch.tokens is None else batch.tokens.tolist(),
        "owner": None if batch.owner is None else batch.owner.tolist(),
        "visual": batch.visual.tolist(),
    }


def _expected_visual():
    flags = [[i % 3 == 0 and n > 2 for i in range(n)] for n in (8, 5, 4, 10)]
    return [f + [False] * (10 - len(f)) for f in flags]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_indices(device):
    got = _lists(_RowBatch.build(_step(device), 12, device))
    assert got == {
        "slots": ["a", "b", "p", "c"],
        "others": ["m"],
        "last": [0, 1, 5, 11],
        "rows": [0, 1, 2, 5],
        "lengths": [8, 5, 4, 10],
        "in_order": False,
        "groups": [(("A",), [0, 1, 3], [True, True, True]), (("B",), [2], [True])],
        # rows 0..5 (a, b, then p's four rows, each p's) and row 11 (c)
        "runs": [(0, 6, [0, 1, 2, 2, 2, 2]), (11, 12, (3, 4))],
        "tokens": None,
        "owner": None,
        "visual": _expected_visual(),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_batch_indices_scattered_rows(device, monkeypatch):
    monkeypatch.setattr(attachment, "_MAX_RUNS", 1)  # two runs: their rows are listed one by one
    got = _lists(_RowBatch.build(_step(device), 12, device))
    assert got["runs"] is None
    assert got["tokens"] == [0, 1, 2, 3, 4, 5, 11] and got["owner"] == [0, 1, 2, 2, 2, 2, 3]
    assert got["last"] == [0, 1, 5, 11] and got["lengths"] == [8, 5, 4, 10]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_of_decoding_requests_in_order(device):
    rules = ("A",)
    slots = [_slot(name, LAST, rules, i, i, i + 1, 3 + i, device) for i, name in enumerate("xyz")]
    got = _lists(_RowBatch.build(slots, 3, device))
    assert got["in_order"] and got["runs"] == [(0, 3, (0, 3))]
    assert got["last"] == [0, 1, 2] and got["rows"] == [0, 1, 2] and got["lengths"] == [4, 5, 6]
    assert got["groups"] == [(rules, [0, 1, 2], [True, True, True])]
    empty = _lists(_RowBatch.build([], 0, device))
    assert empty["slots"] == [] and empty["last"] == [] and empty["runs"] == [] and empty["visual"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_does_not_wait_for_the_gpu():
    """Building a step's plan on a GPU copies its indices from pinned memory without a
    synchronizing copy (torch raises on one in sync debug mode "error")."""
    slots = _step("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = _RowBatch.build(slots, 12, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _lists(batch) == _lists(_RowBatch.build(_step("cpu"), 12, "cpu"))
