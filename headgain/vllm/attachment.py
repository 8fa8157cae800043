"""`Attachment`: headgain on one vLLM model in one worker, step by step.

At each engine step (one ``execute_model`` call of the model runner) the packed tokens of
the scheduled requests run through every decoder layer at once. The first decoder layer's
attention builds the step's plan: for each request with a config, its rows in the packed
batch (in the order of the runner's ``input_batch``), the tokens it computed before, its
visual positions (vLLM's multimodal placeholders of its images and videos; for a request
without them, the tokens whose id the arch map calls visual) and a `ForwardState` over its
own sequence. Then, at every layer, the ``Attention`` module's forward (wrapped when the
model loads, before vLLM compiles it) calls one opaque op, ``headgain_vllm::rescale_heads_``,
which reads each such request's queries after rotary embedding and all its keys so far
(from vLLM's paged KV cache, `headgain.vllm.paged`, once the first step with a config has
shown that headgain reads that cache's layout exactly; else from a copy headgain keeps),
computes S_v at i* (the last prompt token at the prefill, the new token at each decoding
step, exactly as `headgain.attach` does in ``transformers``), and scales the request's rows
of the attention output (the ``o_proj`` input) by the gains, in place. Compiled graphs call
the op at every step; in eager mode the forward does the same work without the op's
dispatch; CUDA graphs would replay without it (refused). Where the keys come from the
paged cache, the step's requests read at i* alone (every decoding request, and prompts and
their chunks with the default query "last") are read together: one S_v op per layer
(`headgain.core.ops.ratio_from_blocks`) reads their keys where they lie, through the block
table.
Requests without a config are never touched: their rows stay bit-identical to vanilla.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..core import ops
from ..core.config import HeadGainConfig
from ..core.errors import HeadGainError
from ..core.readout import ForwardState, layer_gains, layer_ratios
from ..core.rules import LayerRule, layer_rules
from .archs import VllmDecoder, resolve
from .paged import Layout, block_rows, find_layout
from .requests import RequestState, StepRecord
from .settings import PluginSettings, request_config

__all__ = ["Attachment", "attachment_of", "records_of"]

_ATTR = "_headgain_vllm"  # attribute of the attached model


def attachment_of(model: nn.Module) -> Attachment | None:
    """The `Attachment` on a vLLM model (in the worker that holds it), or None."""
    return model.__dict__.get(_ATTR)


def records_of(model: nn.Module) -> tuple[int, dict[str, list[dict]]]:
    """What one worker kept with ``HEADGAIN_RECORD``, in plain Python (any transport sends it):
    (first head, {request id: one dict per step with ``past`` and ``tokens`` (ints), ``ratios``
    and ``gains`` ((L, H) nested lists of floats)}), the H heads of this tensor-parallel rank
    starting at that head of the whole model. Made to be sent to the workers:
    ``llm.apply_model(records_of)`` gives one pair per rank (with engine processes, set
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)."""
    attachment = attachment_of(model)
    if attachment is None:
        raise HeadGainError("headgain is not attached to this vLLM model; start vLLM with HEADGAIN_VLLM=1")
    records = {
        req_id: [
            {"past": s.past, "tokens": s.tokens, "ratios": s.ratios.tolist(), "gains": s.gains.tolist()} for s in steps
        ]
        for req_id, steps in attachment.records.items()
    }
    return attachment.decoder.first_head, records


@dataclass(eq=False)
class _Slot:
    """One configured request in one step: rows [start, end) of the packed batch, row ``row``
    of the step's block table, ``past`` tokens computed before; ``flags``: (end - start,) bool,
    which of its tokens are visual."""

    request: RequestState
    row: int
    start: int
    end: int
    past: int
    flags: torch.Tensor
    ratios_record: torch.Tensor | None = None  # (L, H) float32 when recording
    gains_record: torch.Tensor | None = None
    _state: ForwardState | None = None

    @property
    def state(self) -> ForwardState:
        """The pass's `ForwardState`, built on first use: only passes read at several rows, and
        passes whose keys come from headgain's copy, need one (a batch of requests read at i*
        takes their visual flags straight from the requests)."""
        if self._state is None:
            previous = self.request.visual[: self.past][None] if self.past else None
            self._state = ForwardState.build(self.flags[None], None, previous, self.request.cfg.query)
        return self._state


@dataclass(eq=False)
class _RowBatch:
    """The step's requests with a config whose S_v is read at one query row, i* (every
    decoding request; a prompt or chunk of one with the config query "last"), read together
    where the keys come from vLLM's paged cache: one S_v op per layer, reading the keys where
    they lie, and their rows scaled in place, a run of consecutive rows at a time.

    Attributes:
        slots: the R requests' slots.
        others: the step's other slots with a config (passes read at several rows).
        last: (R,) int64, each one's i* row in the packed batch (its last).
        rows: (R,) int64, each one's row of the block table.
        in_order: the R requests decode and are the whole packed batch and the block
            table's first R rows, in order: their query rows and table rows are read where
            they lie.
        runs: (start, end, gains) per run of consecutive packed rows [start, end) of the
            requests (one when every request of the step is in the batch): the run's rows
            take the gains of the requests at ``gains`` (a slice of the batch when each has
            one row, else (end - start,) int64 positions in the batch, one per row). None
            when the requests' rows are scattered over more than `_MAX_RUNS` runs.
        tokens, owner: when ``runs`` is None, (N,) int64 rows of all the requests in the
            packed batch and the position in the batch of the request each belongs to
            (their rows are copied out, scaled and copied back); else None.
        lengths: (R,) int64, each one's keys (its context, this step's tokens included).
        visual: (R, max length) bool, its visual keys.
        groups: (rules, (G,) int64 positions in the batch, (G,) bool has_visual) per set of
            requests that share their rules (the same config): one gains op each.
    """

    slots: list[_Slot]
    others: list[_Slot]
    last: torch.Tensor
    rows: torch.Tensor
    in_order: bool
    runs: list[tuple[int, int, slice | torch.Tensor]] | None
    tokens: torch.Tensor | None
    owner: torch.Tensor | None
    lengths: torch.Tensor
    visual: torch.Tensor
    groups: list[tuple[tuple[LayerRule, ...], torch.Tensor, torch.Tensor]]
    _tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def table_rows(self, table: torch.Tensor) -> torch.Tensor:
        """(R, MB) rows of the step's (num_requests, MB) block table ``table`` for the batch's
        requests: the table's first R rows when ``in_order``, else selected once per step and
        table (the layers of one KV-cache group share their table)."""
        if self.in_order:
            return table[: len(self.slots)]
        held = self._tables.get(id(table))
        if held is None or held[0] is not table:
            held = self._tables[id(table)] = (table, table[self.rows])
        return held[1]

    @classmethod
    def build(cls, step_slots: list[_Slot], num_tokens: int, device) -> _RowBatch:
        """The batch of the slots among ``step_slots`` (those of a step of ``num_tokens``
        packed tokens) read at i* alone."""
        slots, others = [], []
        for slot in step_slots:
            one_row = slot.end - slot.start == 1 or slot.request.cfg.query == "last"
            (slots if one_row else others).append(slot)
        in_order = len(slots) == num_tokens and all(s.start == i and s.row == i for i, s in enumerate(slots))
        lengths = [slot.past + slot.end - slot.start for slot in slots]
        if slots:
            visual = pad_sequence([slot.request.visual[:n] for slot, n in zip(slots, lengths)], batch_first=True)
        else:
            visual = torch.zeros(0, 0, dtype=torch.bool, device=device)
        has_visual = visual.any(1)
        members: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            members.setdefault(id(slot.request.rules), []).append(i)
        spans: list[list[int]] = []  # [start, end, first request, last request + 1] per run of rows
        for i, slot in enumerate(slots):
            if spans and spans[-1][1] == slot.start:
                spans[-1][1], spans[-1][3] = slot.end, i + 1
            else:
                spans.append([slot.start, slot.end, i, i + 1])
        # every index the step needs, in one host-to-device copy; `take` hands out its parts
        ints = [slot.end - 1 for slot in slots] + [slot.row for slot in slots] + lengths
        parts = [len(slots)] * 3
        for idx in members.values():
            ints += idx
            parts.append(len(idx))
        by_runs = len(spans) <= _MAX_RUNS  # scaled in place, run by run (else through a copy of the rows)
        if by_runs:
            for start, end, a, b in spans:
                if end - start != b - a:  # requests of several rows: each row's request
                    ints += _owners(slots, a, b)
                    parts.append(end - start)
        else:
            rows = [t for slot in slots for t in range(slot.start, slot.end)]
            ints += rows + _owners(slots, 0, len(slots))
            parts += [len(rows), len(rows)]
        take = iter(_to_device(torch.tensor(ints, dtype=torch.long), device).split(parts))
        last, table_rows, lengths_t = next(take), next(take), next(take)
        groups = []
        for idx in members.values():
            positions = next(take)
            groups.append((slots[idx[0]].request.rules, positions, has_visual.index_select(0, positions)))
        runs = tokens = owner = None
        if by_runs:
            runs = [(start, end, slice(a, b) if end - start == b - a else next(take)) for start, end, a, b in spans]
        else:
            tokens, owner = next(take), next(take)
        return cls(slots, others, last, table_rows, in_order, runs, tokens, owner, lengths_t, visual, groups)


def _to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU from pinned memory without waiting for the copy
    (a plain copy from pageable memory would make the CPU wait for the GPU at every step)."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# A batch whose requests' rows lie in more runs than this (requests with and without a config
# interleaved) is scaled through one copy of its rows instead of one op per run.
_MAX_RUNS = 8


def _owners(slots: list[_Slot], a: int, b: int) -> list[int]:
    """For each packed row of requests a..b-1 of ``slots``, its request's position."""
    return [i for i in range(a, b) for _ in range(slots[i].start, slots[i].end)]


class Attachment:
    """headgain on one vLLM model (see the module docstring).

    Attributes:
        decoder: the resolved decoder (this tensor-parallel rank's heads: the records hold
            heads ``decoder.first_head`` to ``decoder.first_head + decoder.num_heads - 1``).
        settings: the plugin's settings.
        records: request id -> list of `StepRecord` (the last ``settings.record`` requests).
        key_source: where S_v reads earlier keys: "paged cpu" / "paged nhd" (vLLM's KV
            cache, in that `headgain.vllm.paged` layout), "copy" (headgain's own copy), or
            None until the first step with a config has checked the layout.
    """

    def __init__(self, model: nn.Module, hf_config, settings: PluginSettings, rank: int = 0):
        if attachment_of(model) is not None:
            raise HeadGainError("headgain is already attached to this vLLM model")
        self.decoder: VllmDecoder = resolve(model, hf_config, settings.arch_map, rank)
        self.settings = settings
        if settings.default is not None:
            settings.default.check_layers(self.decoder.num_layers)
        self.records: OrderedDict[str, list[StepRecord]] = OrderedDict()
        self._requests: dict[str, RequestState] = {}
        self._step = None  # (runner, scheduler_output) while a step runs
        self._slots: list[_Slot] | None = None  # the step's plan, built at its first layer
        self._batch: _RowBatch | None = None  # its requests read at i*, when keys come from the paged cache
        self._rules: dict[HeadGainConfig, tuple[LayerRule, ...]] = {}
        self._visual_ids: dict[torch.device, torch.Tensor] = {}  # the arch map's visual token ids, per device
        self._warned_no_visual = False
        self._warned_chunked = False
        self._warned_preempted = False
        self.key_source: str | None = "copy" if settings.keys == "copy" else None
        self._layout: Layout | None = None
        self._checked: dict[int, Layout | None] = {}  # layer position -> layout found, while checking
        self._token = next(_TOKENS)
        _ATTACHMENTS[self._token] = self
        for position, layer in enumerate(self.decoder.layers):  # for the engine's lifetime: never removed
            layer.attn.forward = self._forward_of(layer.attn, position)
        model.__dict__[_ATTR] = self

    # ------------------------------------------------------------------ engine steps
    def begin_step(self, runner, scheduler_output) -> None:
        """Called by the model runner's ``execute_model`` before it runs: forget finished requests."""
        for req_id in scheduler_output.finished_req_ids:
            self._requests.pop(req_id, None)
        self._step, self._slots, self._batch = (runner, scheduler_output), None, None

    def end_step(self) -> None:
        """Called when ``execute_model`` returns or raises: keep the step's records."""
        slots, self._step, self._slots, self._batch = self._slots, None, None, None
        for slot in slots or ():
            if slot.ratios_record is not None:
                n = slot.end - slot.start
                slot.request.steps.append(StepRecord(slot.past, n, slot.ratios_record, slot.gains_record))
        if self.key_source is None and len(self._checked) == self.decoder.num_layers:
            self._settle_key_source()
        self._checked.clear()

    def _settle_key_source(self) -> None:
        """After the first step with a config has run through every layer: read keys from the
        paged cache if one layout gave back every layer's new keys exactly, else keep copies."""
        found = set(self._checked.values())
        if len(found) == 1 and None not in found:
            (self._layout,) = found
            self.key_source = f"paged {self._layout.name}"
            for request in self._requests.values():  # the copies made while checking
                request.keys = None
            return
        self.key_source = "copy"
        missing = sorted(self.decoder.layers[p].index for p, layout in self._checked.items() if layout is None)
        warnings.warn(
            "headgain cannot read this attention backend's paged KV cache"
            + (f" (no known layout gave back the keys of decoder layers {missing})" if missing else "")
            + "; it keeps its own copy of the keys of requests with a config (the K half of their KV cache again)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _plan(self) -> list[_Slot]:
        if self._slots is None:
            self._slots = self._build_plan(*self._step)
        return self._slots

    def _build_plan(self, runner, scheduler_output) -> list[_Slot]:
        slots, offset = [], 0
        ids = runner.input_ids.gpu
        scheduled = scheduler_output.num_scheduled_tokens
        total = sum(int(scheduled[req_id]) for req_id in runner.input_batch.req_ids)
        packed = no_visual = None  # (total,) bool: the step's tokens whose id is visual; all False (on first use)
        for row, req_id in enumerate(runner.input_batch.req_ids):
            n = int(scheduled[req_id])
            start, offset = offset, offset + n
            cached = runner.requests[req_id]
            request = self._requests.get(req_id)
            if request is None:
                request = self._request(req_id, cached)
            if request.cfg is None:
                continue
            past, prompt = int(cached.num_computed_tokens), int(cached.num_prompt_tokens)
            if past == 0:  # a prefill, or the recomputation of a preempted request
                if request.length > prompt and not self._warned_preempted:
                    self._warned_preempted = True
                    warnings.warn(_PREEMPTED.format(req_id=req_id, n=n), RuntimeWarning, stacklevel=2)
                request.reset()
            elif not (past == request.length and (n == 1 or past + n <= cached.num_tokens)):
                raise HeadGainError(_unsupported_step(req_id, past, n, request.length))
            if past + n < prompt and not self._warned_chunked:
                self._warned_chunked = True
                warnings.warn(_CHUNKED.format(req_id=req_id, prompt=prompt, n=n), RuntimeWarning, stacklevel=2)
            if request.placeholders is None:  # visual positions from the arch map's token ids
                if packed is None:
                    packed = torch.isin(ids[:total], self._visual_ids_like(ids))
                flags = packed[start : start + n]
            elif past >= request.placeholders.shape[0]:  # past the prompt's images and videos
                if no_visual is None:
                    no_visual = torch.zeros(total, dtype=torch.bool, device=ids.device)
                flags = no_visual[:n]
            else:  # the request's image and video positions
                flags = request.placeholders[past : past + n]
                flags = _to_device(torch.cat([flags, flags.new_zeros(n - flags.shape[0])]), ids.device)
            request.add_visual(flags)
            prompt_done = past + n >= prompt > past
            if prompt_done and not self._warned_no_visual and not self._prompt_has_visual(request, cached):
                self._warned_no_visual = True
                warnings.warn(
                    f"headgain found no visual tokens in request {req_id}; requests without visual tokens are left "
                    "untouched (gain 1)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            slot = _Slot(request, row, start, start + n, past, flags)
            if self.settings.record:
                shape = (self.decoder.num_layers, self.decoder.num_heads)
                slot.ratios_record, slot.gains_record = torch.zeros(shape), torch.ones(shape)
            slots.append(slot)
        return slots

    def _prompt_has_visual(self, request: RequestState, cached) -> bool:
        """Whether a request's prompt holds visual tokens, read on the CPU (its placeholders, or
        the prompt's token ids vLLM keeps) so that a GPU step does not wait for it; from the
        flags on the device only for a prompt given as embeddings."""
        if request.placeholders is not None:
            return bool(request.placeholders.any())
        if cached.prompt_token_ids is not None:
            return not set(self.decoder.visual_ids).isdisjoint(cached.prompt_token_ids)
        return bool(request.visual[: int(cached.num_prompt_tokens)].any())

    def _visual_ids_like(self, ids: torch.Tensor) -> torch.Tensor:
        """The arch map's visual token ids on ``ids``' device, in its dtype (made once)."""
        visual_ids = self._visual_ids.get(ids.device)
        if visual_ids is None or visual_ids.dtype != ids.dtype:
            visual_ids = self._visual_ids[ids.device] = torch.tensor(
                self.decoder.visual_ids, dtype=ids.dtype, device=ids.device
            )
        return visual_ids

    def _request(self, req_id: str, cached) -> RequestState:
        params = cached.sampling_params
        cfg = request_config(params.extra_args if params is not None else None, self.settings.default)
        request = RequestState(req_id, cfg, placeholders=_placeholders(cached))
        if cfg is not None:
            cfg.check_layers(self.decoder.num_layers)
            if cfg not in self._rules:  # one rules tuple per config: requests that share it share gains ops
                indices = [layer.index for layer in self.decoder.layers]
                self._rules[cfg] = layer_rules(cfg, indices, self.decoder.num_heads)
            request.rules = self._rules[cfg]
            if self.settings.record:
                self.records[req_id] = request.steps
                while len(self.records) > self.settings.record:
                    self.records.popitem(last=False)
        self._requests[req_id] = request
        return request

    # ------------------------------------------------------------------ the op
    def _forward_of(self, attn: nn.Module, position: int):
        """``attn.forward`` with headgain's op after it: S_v from the layer's queries and keys,
        then the configured requests' rows of the attention output scaled in place (one
        opaque op, so that vLLM's compiled graphs call it at every step like eager mode)."""
        original = attn.forward

        def forward(query, key, *args, **kwargs):
            out = original(query, key, *args, **kwargs)
            if torch.compiler.is_compiling():  # traced into the graph, called at every step
                torch.ops.headgain_vllm.rescale_heads_(out, query, key, self._token, position)
            else:  # eager: the same work without the op's dispatch (a tenth of a millisecond per layer)
                self._rescale(position, out, query, key)
            return out

        return forward

    @torch.no_grad()
    def _rescale(self, position: int, out: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        """S_v and gains of every configured request at one layer, from (T, H * D) queries and
        (T, Hkv * D) keys (or their (T, H, D) / (T, Hkv, D) views) of the layer's ``Attention``
        module, which has just stored the keys in its paged cache; the requests' rows of the
        (T, H * D_v) attention output ``out`` (the ``o_proj`` input) scaled in place."""
        if self._step is None:
            return
        slots = self._plan()
        if not slots:
            return
        d = self.decoder
        layer = d.layers[position]
        q = query.reshape(query.shape[0], d.num_heads, d.head_dim)
        k = key.reshape(key.shape[0], d.num_kv_heads, d.head_dim)
        view = out.view(out.shape[0], d.num_heads, d.head_dim_v)
        paged = None if self.key_source == "copy" else block_rows(layer.attn)
        if self._layout is not None and paged is None:
            raise HeadGainError(
                f"decoder layer {layer.index}: the step's attention metadata or KV cache is missing; headgain reads "
                "earlier keys from vLLM's paged cache (set HEADGAIN_KEYS=copy to keep its own copy instead)"
            )
        singles = slots
        if self._layout is not None:  # requests read at i*: all at once, their keys read where they lie
            if self._batch is None:
                self._batch = _RowBatch.build(slots, q.shape[0], q.device)
            batch, (cache, table) = self._batch, paged
            if batch.slots:
                self._rescale_rows(batch, layer, position, q, view, cache, table)
            singles = batch.others
        for slot in singles:
            ratios = self._pass_ratios(slot, layer, position, q, k, paged)
            gains = layer_gains(ratios, slot.state.has_visual, slot.request.rules[position])
            ops.scale_heads_(view[slot.start : slot.end].unsqueeze(0), gains)
            _record(slot, position, ratios[0], gains[0])

    def _pass_ratios(self, slot: _Slot, layer, position: int, q: torch.Tensor, k: torch.Tensor, paged) -> torch.Tensor:
        """(1, H) S_v of a pass of several tokens at the rows its config reads, from its keys:
        its own new ones for a pass from the start; else those of the paged cache (copied out)
        or of headgain's copy (which the first step with a config uses to check the layout)."""
        d = self.decoder
        new, end = k[slot.start : slot.end], slot.end - slot.start + slot.past
        if self._layout is not None and slot.past == 0:  # a pass from the start: its keys are the new ones
            keys = new.transpose(0, 1)[None]
        elif self._layout is not None:
            cache, table = paged
            window = layer.sliding_window  # the keys the pass's first row sees, and all after them
            start = max(0, slot.past + 1 - window) if window else 0
            keys = self._layout.keys(cache, table[slot.row], end, d.num_kv_heads, d.head_dim, start)
        else:
            keys = slot.request.write_keys(d.num_layers, position, slot.past, new)
            if self.key_source is None:  # the first step with a config: which layout gives these keys back?
                found = None if paged is None else find_layout(paged[0], paged[1][slot.row], slot.past, new)
                if self._checked.get(position, found) != found:
                    found = None  # two requests disagree: no layout
                self._checked[position] = found
        rows = q[slot.start : slot.end].permute(1, 0, 2).unsqueeze(0)  # (1, H, n, D)
        num_keys = keys.shape[2]
        return layer_ratios(
            slot.state,
            rows,
            keys,
            scaling=layer.scale,
            mask_rows=slot.state.mask_rows(None, num_keys, layer.sliding_window),
            softcap=layer.softcap,
        )

    def _rescale_rows(self, batch: _RowBatch, layer, position: int, q, view, cache, table) -> None:
        """`_rescale` for the step's requests read at i*, all at once: one S_v op reading their
        keys in the paged cache, one gains op per config, one scaling of their rows."""
        d = self.decoder
        rows = q if batch.in_order else q.index_select(0, batch.last)
        ratios = ops.ratio_from_blocks(
            rows,
            self._layout.blocks(cache, d.num_kv_heads, d.head_dim),
            batch.table_rows(table),
            batch.lengths,
            batch.visual,
            layer.scale,
            layer.softcap,
            layer.sliding_window or 0,
        )
        if len(batch.groups) == 1:
            rules, _, has_visual = batch.groups[0]
            gains = layer_gains(ratios, has_visual, rules[position])
        else:
            gains = torch.empty_like(ratios)
            for rules, members, has_visual in batch.groups:
                gains[members] = layer_gains(ratios[members], has_visual, rules[position])
        if batch.runs is not None:  # in place, a run of rows at a time
            for start, end, owners in batch.runs:
                run_gains = gains[owners] if isinstance(owners, slice) else gains.index_select(0, owners)
                ops.scale_heads_(view[start:end, None], run_gains)
        else:
            scaled = view.index_select(0, batch.tokens)  # (N, H, D_v): their rows, scaled at once
            ops.scale_heads_(scaled[:, None], gains.index_select(0, batch.owner))
            view.index_copy_(0, batch.tokens, scaled)
        if self.settings.record:
            for i, slot in enumerate(batch.slots):
                _record(slot, position, ratios[i], gains[i])


def _record(slot: _Slot, position: int, ratios: torch.Tensor, gains: torch.Tensor) -> None:
    """Keep one request's (H,) ratios and gains of one layer when recording."""
    if slot.ratios_record is not None:
        slot.ratios_record[position] = ratios.cpu()
        slot.gains_record[position] = gains.cpu()


# the op's fourth argument names its attachment (custom ops take no Python objects)
_ATTACHMENTS: weakref.WeakValueDictionary[int, Attachment] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


@torch.library.custom_op("headgain_vllm::rescale_heads_", mutates_args=("out",))
def _rescale_heads(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, attachment: int, position: int) -> None:
    """S_v of the configured requests of the current step at decoder layer ``position`` of
    attachment ``attachment``, from its (T, H * D) queries and (T, Hkv * D) keys, and their
    rows of the (T, H * D_v) attention output ``out`` scaled in place by the gains."""
    _ATTACHMENTS[attachment]._rescale(position, out, query, key)


@_rescale_heads.register_fake
def _(out, query, key, attachment, position) -> None:
    return None


_VISUAL_MODALITIES = ("image", "video")


def _placeholders(cached) -> torch.Tensor | None:
    """(prompt length,) bool: the prompt positions vLLM fills with image or video embeddings
    (its multimodal placeholders), or None for a request without images or videos."""
    features = [f for f in getattr(cached, "mm_features", None) or () if f.modality in _VISUAL_MODALITIES]
    if not features:
        return None
    flags = torch.zeros(int(cached.num_prompt_tokens), dtype=torch.bool)
    for feature in features:
        place = feature.mm_position
        span = flags[place.offset : place.offset + place.length]
        span |= True if place.is_embed is None else place.is_embed.to(torch.bool).cpu()
    return flags


_CHUNKED = (
    "vLLM computes the prompt of request {req_id} ({prompt} tokens) in chunks ({n} tokens first): headgain "
    "treats each chunk as a forward pass of its own, whose i* is its last token and whose gains scale its rows "
    "(as headgain.attach does when a prompt is fed to transformers in pieces through the cache). For one i* at "
    "the last prompt token, the paper's prefill, give vLLM max_num_batched_tokens of at least the longest prompt "
    "or enable_chunked_prefill=False"
)


_PREEMPTED = (
    "vLLM preempted request {req_id} and computes it again ({n} tokens, its prompt and output so far): headgain "
    "treats the recomputation as a new forward pass whose i* is its last token and whose gains scale all of its "
    "rows (as headgain.attach does when transformers is fed the same tokens afresh), so the tokens generated "
    "before keep the gains they had and the recomputed cache gets one gain vector. Give vLLM more KV cache or a "
    "lower max_num_seqs to avoid preemption"
)


def _unsupported_step(req_id: str, past: int, n: int, held: int) -> str:
    """Why a configured request's step cannot be served."""
    if past != held:
        return (
            f"request {req_id}: vLLM computes its tokens from position {past} on while headgain holds {held}: tokens "
            "skipped headgain (it keeps requests with a config out of vLLM's prefix cache, so this is a path "
            "it does not know)"
        )
    return f"request {req_id}: {n} tokens in one decoding step after {past}; speculative decoding is not supported"
