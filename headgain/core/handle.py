"""`attach` and `Handle`: install headgain on a model, run it, and take it off exactly.

`attach` resolves the model's decoder (`headgain.core.registry.resolve`), then hands it
to an adapter that reaches each decoder layer's attention: ``transformers`` models
through their attention interface (`headgain.adapters.hf`), plain PyTorch models through
their ``scaled_dot_product_attention`` calls (`headgain.adapters.sdpa`). The `Handle`
holds what both share: the config and its per-layer rules, the per-pass bookkeeping (one
per thread), the S_v read-out, the gains and the scaling of the head outputs.

Lifecycle rules (each tested):

* A pass starts when the model, or the module that runs its decoder layers, is called
  (the outermost of the two in a call). ``generate()`` of models that generate through
  a submodule (BLIP-2, InstructBLIP) works: the visual positions come from the
  ``input_ids`` given to the attached model's ``generate``.
* Per-pass state is per thread: one attached model can run in several threads at once;
  ``last_ratios`` / ``last_gains`` are those of the calling thread's latest pass.
* A layer that runs again outside its pass (activation checkpointing recomputes layers
  during backward) gets the gains it had in its pass: training-mode passes keep their
  gains (the last 8 passes), matched to the recomputation by a fingerprint of the
  layer's queries and keys.
* A copy of an attached model (``copy.deepcopy``, ``torch.save`` + ``torch.load``,
  pickle) carries an attachment of its own, with the same config: ``headgain.handle_of
  (copy)`` returns it. Detaching one leaves the other attached and working.
* Nothing global refers to a model or handle, so an attached model that is deleted
  without ``detach()`` is freed like any other.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import ops
from .archmap import ArchMap
from .config import HeadGainConfig
from .decoder import ResolvedDecoder
from .errors import HeadGainError
from .readout import ForwardState, layer_gains
from .registry import resolve
from .rules import LayerRule, layer_rules

__all__ = ["attach", "borrowed", "handle_of", "Handle"]


def attach(
    model: nn.Module,
    arch_map: ArchMap | str | None = None,
    cfg: HeadGainConfig | str | Mapping[str, Any] | None = None,
    *,
    fused: bool = True,
) -> Handle:
    """Attach functional-head rescaling to ``model``'s language decoder.

    Args:
        model: a ``transformers`` model (for example ``Qwen2_5_VLForConditionalGeneration``),
            or a plain PyTorch module whose attention modules call
            ``torch.nn.functional.scaled_dot_product_attention`` (then ``arch_map`` is
            required). Call this model (``model(...)``, ``model.generate(...)``) afterwards.
        arch_map: an `ArchMap`, the name of a registered one, or None to look it up by
            ``model.config.model_type``.
        cfg: a `HeadGainConfig`, a preset name, a dict of fields, or None (preset
            ``ocean-r1-7b``).
        fused: at decoding steps (one new token per sample) of a ``transformers`` model on
            the sdpa backend, on CPU, compute the attention output and S_v in one pass over
            the keys and values (`ops.decode_attention`) instead of calling the backend and
            then reading the keys again. False keeps the backend at every step. Also
            ``handle.fused``.

    Returns:
        A `Handle`; ``handle.detach()`` (or leaving its ``with`` block) restores the model.

    Everything is validated before the model is touched: on error the model is unchanged.
    """
    if not isinstance(fused, bool):
        raise HeadGainError(f"fused takes True or False, got {fused!r} ({type(fused).__name__})")
    cfg = HeadGainConfig.coerce(cfg)
    existing = handle_of(model)
    if existing is not None:
        raise HeadGainError("headgain is already attached to this model; call handle.detach() before attaching again")
    decoder = resolve(model, arch_map)
    cfg.check_layers(decoder.num_layers)
    handle = Handle(model, decoder, cfg)
    handle._fused = fused
    return handle


def handle_of(model: nn.Module) -> Handle | None:
    """The `Handle` attached to ``model`` (also the one a copy of an attached model carries), or None."""
    handle = getattr(model, "_headgain_handle", None)
    return handle if isinstance(handle, Handle) and handle.attached else None


@contextlib.contextmanager
def borrowed(
    model: nn.Module, arch_map=None, cfg: HeadGainConfig | None = None, enabled: bool = True
) -> Iterator[Handle]:
    """The model's handle, or a temporary attachment when it has none, for one block.

    ``cfg`` (when given) and ``enabled`` are set for the block; on exit a temporary handle
    is detached and an existing one gets its own config and state back, even on error.
    """
    handle = handle_of(model)
    temporary = handle is None
    if temporary:
        # layer bounds of 0 fit a decoder of any depth
        handle = attach(model, arch_map, cfg if cfg is not None else HeadGainConfig(l_perc=0, l_reas=0))
    saved = handle.cfg, handle.enabled
    try:
        if cfg is not None and not temporary:  # a temporary handle was attached with it
            handle.cfg = cfg
        handle.enabled = enabled
        yield handle
    finally:
        if temporary:
            handle.detach()
        else:
            handle.cfg, handle.enabled = saved


class _Local(threading.local):
    """Per-thread bookkeeping of one handle (a fresh, empty one in every thread)."""

    def __init__(self) -> None:
        self.owner: nn.Module | None = None  # the entry module whose call is the pass in flight
        self.state: ForwardState | None = None  # the pass in flight, or the latest one (decoding continues it)
        self.rules: tuple[LayerRule, ...] = ()  # the config's rules when the pass began
        self.enabled = True
        self.pass_id = 0
        self.calls = 0
        self.ratios: list[torch.Tensor | None] = []
        self.gains: list[torch.Tensor | None] = []
        self.user_mask: tuple[torch.Tensor, bool] | None = None  # (mask, keep)
        self.prompt_ids: torch.Tensor | None = None  # input_ids of the generate() call in flight
        self.pending: dict[int, torch.Tensor | None] = {}  # layer position -> gains for its o_proj (plain models)
        self.readers: dict[int, list] = {}  # layer position -> function modes in flight (plain models)
        self.visual_known = False  # whether this pass's visual flags came from a mask or token ids


class _Records:
    """Gains of recent training-mode passes, for layers that run again outside their pass.

    Activation checkpointing recomputes a layer's forward during backward, after the pass
    has ended (possibly in another thread). The recomputation must apply the gains of the
    original pass; it is matched to its pass by a fingerprint of the layer's queries and
    keys (sums in float32), among the last `KEEP` training-mode passes.
    """

    KEEP = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passes: OrderedDict[int, dict[int, tuple[torch.Tensor, torch.Tensor | None]]] = OrderedDict()

    def add(self, pass_id: int, position: int, fingerprint: torch.Tensor, gains: torch.Tensor | None) -> None:
        with self._lock:
            layers = self._passes.setdefault(pass_id, {})
            layers[position] = (fingerprint, gains)
            while len(self._passes) > self.KEEP:
                self._passes.popitem(last=False)

    def find(self, position: int, fingerprint: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """(found, gains) of the recorded pass whose fingerprint matches (relative 1e-3)."""
        with self._lock:
            candidates = [layers[position] for layers in self._passes.values() if position in layers]
        if not candidates:
            return False, None
        prints = torch.stack([fp for fp, _ in candidates])
        error = ((prints - fingerprint).abs() / (fingerprint.abs() + 1e-6)).amax(1)
        best = int(torch.argmin(error))
        if float(error[best]) > 1e-3:
            return False, None
        return True, candidates[best][1]

    def clear(self) -> None:
        with self._lock:
            self._passes.clear()


def _fingerprint(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(2,) float32 on the inputs' device: the sums of the queries and of the keys."""
    return torch.stack([query.sum(dtype=torch.float32), key.sum(dtype=torch.float32)])


class Handle:
    """A live attachment of headgain to one model.

    Attributes:
        model: the attached model.
        decoder: its `ResolvedDecoder` (layers, heads, visual ids, backend).
        attached: False once `detach` ran.

    Read after a forward pass (prefill or one decoding step) in the same thread:
        last_ratios: (L, B, H) float32 on the CPU, S_v of every head at i*.
        last_gains: (L, B, H) float32 on the CPU, the gains applied.
        last_has_visual: (B,) bool, which samples held visual tokens.
    """

    def __init__(self, model: nn.Module, decoder: ResolvedDecoder, cfg: HeadGainConfig):
        self.model = model
        self.decoder = decoder
        self._cfg = cfg
        self._rules = layer_rules(cfg, [layer.index for layer in decoder.layers], decoder.num_heads)
        self._enabled = True
        self._fused = True
        self._gates: list[torch.Tensor] | None = None
        self._warned_no_visual = False
        self._warned_kept_mask = False
        self._pass_ids = itertools.count(1)
        self._local = _Local()
        self._records = _Records()
        self._id_tensors: dict[torch.device, torch.Tensor] = {}
        self._adapter = _adapter_for(decoder)
        self._hooks: list = []
        self.attached = True
        try:
            self._adapter.install(self)
        except BaseException:
            self.detach()
            raise
        model._headgain_handle = self

    # ------------------------------------------------------------------ public API
    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    @property
    def num_heads(self) -> int:
        return self.decoder.num_heads

    @property
    def head_dim(self) -> int:
        return self.decoder.head_dim

    @property
    def layer_names(self) -> list[str]:
        return self.decoder.names

    @property
    def cfg(self) -> HeadGainConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, value) -> None:
        cfg = HeadGainConfig.coerce(value)
        cfg.check_layers(self.num_layers)
        self._rules = layer_rules(cfg, [layer.index for layer in self.decoder.layers], self.num_heads)
        self._cfg = cfg

    @property
    def enabled(self) -> bool:
        """Whether gains are applied (ratios are recorded either way). Takes bools only."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise HeadGainError(f"handle.enabled takes True or False, got {value!r} ({type(value).__name__})")
        self._enabled = value

    @property
    def fused(self) -> bool:
        """Whether decoding steps use the fused attention + S_v kernel where it applies (see
        `attach`). Takes bools only."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise HeadGainError(f"handle.fused takes True or False, got {value!r} ({type(value).__name__})")
        self._fused = value

    @property
    def last_ratios(self) -> torch.Tensor | None:
        """(L, B, H) float32 on the CPU: S_v at i* in this thread's latest forward pass (None before any)."""
        ratios = self._local.ratios
        if not ratios or any(t is None for t in ratios):
            return None
        return torch.stack(ratios).float().cpu()

    @property
    def last_gains(self) -> torch.Tensor | None:
        """(L, B, H) float32 on the CPU: gains applied in this thread's latest forward pass (None before any)."""
        ratios = self.last_ratios
        if ratios is None:
            return None
        gains = [torch.ones_like(r) if g is None else g.float().cpu() for g, r in zip(self._local.gains, ratios)]
        return torch.stack(gains)

    @property
    def last_has_visual(self) -> torch.Tensor | None:
        """(B,) bool on the CPU: which samples of this thread's latest forward pass hold visual tokens."""
        state = self._local.state
        return None if state is None else state.has_visual.cpu()

    def set_visual_mask(self, mask: torch.Tensor | None, *, keep: bool = False) -> None:
        """Mark visual positions by hand, for inputs without visual token ids (``inputs_embeds``,
        plain PyTorch models).

        Args:
            mask: (B, N) bool (or 0/1 integers) over the prompt of the next forward pass that
                starts a new prompt in this thread; it must match that prompt's batch size and
                length. Tokens added while decoding are text unless their ids are visual ids.
                A pass that continues a cache which no pass of this attachment filled (a
                prefill run before attaching, a cache kept from elsewhere) takes a mask of
                shape (B, tokens in the cache) as the cached tokens' visual positions.
                None clears it and goes back to token ids.
            keep: False (default): the mask serves the next prompt only and is then dropped,
                so it cannot silently apply to a later input. True: it serves every following
                prompt of this thread until cleared (for a fixed layout); where the prompt also
                carries visual token ids that disagree with it, the mask wins and a warning
                says so once.
        """
        if mask is None:
            self._local.user_mask = None
            return
        if not isinstance(keep, bool):
            raise HeadGainError(f"keep takes True or False, got {keep!r}")
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise HeadGainError(f"visual mask must be 2-D (batch, sequence), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
                raise HeadGainError(f"visual mask must be bool or hold only 0 and 1, got dtype {mask.dtype}")
            mask = mask.bool()
        self._local.user_mask = (mask, keep)

    @contextlib.contextmanager
    def gates(self, values: Sequence[torch.Tensor] | torch.Tensor | None = None) -> Iterator[list[torch.Tensor]]:
        """Gates on every head for the duration of the block (contribution maps, appendix H.1).

        Args:
            values: (L, H) initial gate values (default: ones).

        Yields:
            L tensors of shape (H,), float32, ``requires_grad=True``, each on its layer's
            device. Every forward pass in the block multiplies head h of layer l by
            ``gain * gates[l][h]`` at the rescaling site (out of place, so gradients flow to
            the gates); gates of one leave every output bit for bit as it was. The gates are
            removed on exit, even on error. Gates are shared by all threads.
        """
        if self._gates is not None:
            raise HeadGainError("gates are already installed on this handle (nested gates are not supported)")
        gates = []
        for position, layer in enumerate(self.decoder.layers):
            device = next((p.device for p in layer.module.parameters()), torch.device("cpu"))
            init = torch.ones(self.num_heads) if values is None else torch.as_tensor(values[position]).detach()
            if init.shape != (self.num_heads,):
                raise HeadGainError(
                    f"gate values of layer {position} must have shape ({self.num_heads},), got {tuple(init.shape)}"
                )
            gates.append(init.to(device=device, dtype=torch.float32).clone().requires_grad_(True))
        self._gates = gates
        try:
            yield gates
        finally:
            self._gates = None

    def detach(self) -> None:
        """Restore the model exactly as it was before `attach`; calling it again does nothing."""
        if not self.attached:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._adapter.uninstall(self)
        if self.model.__dict__.get("_headgain_handle") is self:
            del self.model._headgain_handle
        self._records.clear()
        self.attached = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"Handle({state}, {type(self.model).__name__}, layers={self.num_layers}, heads={self.num_heads}, "
            f"backend={self.decoder.backend!r} ({self.decoder.kind}), enabled={self.enabled}, cfg={self._cfg})"
        )

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"], state["_records"], state["_pass_ids"], state["_id_tensors"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = _Local()
        self._records = _Records()
        self._id_tensors = {}
        self._pass_ids = itertools.count(1)
        self._adapter.restore(self)

    # ------------------------------------------------------------------ for the adapters
    def _add_hook(self, hook) -> None:
        self._hooks.append(hook)

    def _watch(self, entries: Sequence[nn.Module]) -> None:
        """Start and end passes at the calls of ``entries`` (the outermost one in a call wins)."""
        for module in entries:
            self._add_hook(module.register_forward_pre_hook(self._entry_pre, with_kwargs=True))
            self._add_hook(module.register_forward_hook(self._entry_post, always_call=True))

    def _entry_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._begin_pass(module, args, kwargs)

    def _entry_post(self, module: nn.Module, args: tuple, output) -> None:
        self._end_pass(module, failed=output is None)  # None: the forward raised

    def _begin_pass(self, entry: nn.Module, args: tuple, kwargs: dict) -> None:
        """Start a pass when ``entry`` is the outermost entry module called in this thread."""
        local = self._local
        if local.owner is not None and local.owner is not entry:
            return  # an inner entry: the outer call owns the pass
        call = _arguments(entry, args, kwargs)
        input_ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)  # plain models: the first tensor
        if input_ids is None and first is not None and not first.is_floating_point():
            input_ids = first  # token ids passed positionally under another name
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            input_ids = None
        source = next((t for t in (input_ids, embeds, first) if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
        user = local.user_mask
        if source is not None:
            batch, length = source.shape[:2]
            device = source.device
        elif user is not None:
            batch, length = user[0].shape
            device = next((p.device for p in entry.parameters()), torch.device("cpu"))
        else:  # nothing says the length: `sized` fixes it at the first attention call
            batch, length, device = 1, 1, next((p.device for p in entry.parameters()), torch.device("cpu"))
        cache = call.get("past_key_values", call.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        new_prompt = past == 0
        previous = None
        if not new_prompt:
            previous = local.state.visual if local.state is not None else None
            if previous is None or previous.shape != (batch, past):
                previous = self._cached_mask(batch, past, device)
            if previous is None or previous.shape != (batch, past):
                seen = "nothing" if previous is None else f"{tuple(previous.shape)} (batch, tokens)"
                raise HeadGainError(
                    f"the cache holds {past} tokens for a batch of {batch}, but headgain saw {seen} for this prompt in "
                    "this thread; run the whole prompt through the attached model (attach before the prefill), or "
                    f"give the cached tokens' visual positions with handle.set_visual_mask(mask of shape ({batch}, "
                    f"{past}))"
                )
        current, local.visual_known = self._visual_of_prompt(new_prompt, input_ids, embeds, (batch, length), device)
        local.visual_known = local.visual_known or not new_prompt
        mask = call.get("attention_mask")
        valid = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid = mask[:, -length:].to(device=device, dtype=torch.bool)
        local.state = ForwardState.build(current, valid, previous, self._cfg.query)
        if new_prompt and not self._warned_no_visual and not bool(local.state.has_visual.all()):
            self._warned_no_visual = True
            warnings.warn(
                "headgain found no visual tokens in at least one sample; those samples are left untouched (gain 1). "
                "Pass images through the processor, or mark visual positions with handle.set_visual_mask(mask).",
                RuntimeWarning,
                stacklevel=3,
            )
        local.rules, local.enabled = self._rules, self._enabled
        local.pass_id = next(self._pass_ids)
        local.calls = 0
        local.ratios = [None] * self.num_layers
        local.gains = [None] * self.num_layers
        local.pending = {}
        local.owner = entry

    def _cached_mask(self, batch: int, past: int, device: torch.device) -> torch.Tensor | None:
        """The user's mask when it covers the ``past`` cached tokens of a cache this thread's
        passes did not fill ((B, past) bool on ``device``), else None; a mask set without
        ``keep`` is used up."""
        local = self._local
        if local.user_mask is None or tuple(local.user_mask[0].shape) != (batch, past):
            return None
        mask, keep = local.user_mask
        if not keep:
            local.user_mask = None
        return mask.to(device)

    def _visual_of_prompt(self, new_prompt, input_ids, embeds, shape, device) -> tuple[torch.Tensor, bool]:
        """(B, N) bool visual flags of this pass's positions, and whether a mask or token ids gave them."""
        local = self._local
        ids = self._visual_id_tensor(device)
        from_ids = None
        if input_ids is not None and ids is not None:
            from_ids = torch.isin(input_ids, ids)
        elif embeds is not None and ids is not None and new_prompt and local.prompt_ids is not None:
            if tuple(local.prompt_ids.shape[:2]) == tuple(shape):  # generate() passed only the embeddings on
                from_ids = torch.isin(local.prompt_ids.to(device), ids)
        if new_prompt and local.user_mask is not None:
            mask, keep = local.user_mask
            if tuple(mask.shape) != tuple(shape):
                raise HeadGainError(
                    f"visual mask has shape {tuple(mask.shape)} but the prompt is {tuple(shape)} (batch, sequence); "
                    "call handle.set_visual_mask with a mask for this input, or set_visual_mask(None) to detect "
                    "visual tokens from their ids"
                )
            mask = mask.to(device)
            if not keep:
                local.user_mask = None
            elif from_ids is not None and not self._warned_kept_mask and not torch.equal(mask, from_ids):
                self._warned_kept_mask = True
                warnings.warn(
                    "the visual mask kept with set_visual_mask(..., keep=True) disagrees with the visual token ids of "
                    "this prompt; the mask wins. Call handle.set_visual_mask(None) to go back to token ids.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return mask, True
        if from_ids is not None:
            return from_ids, True
        return torch.zeros(shape, dtype=torch.bool, device=device), False

    def _visual_id_tensor(self, device: torch.device) -> torch.Tensor | None:
        """(V,) int64 visual token ids on ``device`` (made once per device), or None without ids."""
        if not self.decoder.visual_ids:
            return None
        got = self._id_tensors.get(device)
        if got is None:
            got = self._id_tensors[device] = torch.tensor(self.decoder.visual_ids, dtype=torch.long, device=device)
        return got

    def _sized(self, batch: int, length: int) -> ForwardState:
        """The pass's state, remade for (batch, length) positions when nothing gave the visual
        positions (then every position is text); raises when a mask or ids disagree."""
        local = self._local
        state = local.state
        if tuple(state.visual.shape) == (batch, length):
            return state
        if local.visual_known:
            raise HeadGainError(
                f"the attention sees {batch} x {length} (batch, keys) positions but the visual positions of this pass "
                f"cover {tuple(state.visual.shape)}; give set_visual_mask a ({batch}, {length}) mask (plain PyTorch "
                "models are read without a KV cache: one call covers the whole sequence)"
            )
        local.state = ForwardState.build(
            torch.zeros((batch, length), dtype=torch.bool, device=state.visual.device), None, None, self._cfg.query
        )
        return local.state

    def _end_pass(self, entry: nn.Module, failed: bool) -> None:
        local = self._local
        if local.owner is not entry:
            return
        local.owner = None
        if not failed and local.calls != self.num_layers:
            raise HeadGainError(
                f"only {local.calls} of {self.num_layers} decoder layers went through {self._adapter.route} in this "
                f"call of {type(entry).__name__}; headgain cannot act on attention modules that compute attention "
                f"another way. {self._adapter.bypass_hint}"
            )

    def _layer_gains(
        self,
        position: int,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        read: Callable[[ForwardState], torch.Tensor],
    ) -> torch.Tensor | None:
        """Read S_v of one layer and return its (B, H) float32 gains (None: leave it as it is).

        ``read(state)`` returns the layer's (B, H) float32 ratios (`layer_ratios`, or a
        fused kernel that also computes the attention output); it is not called outside a
        pass (a recomputation during backward), where the gains of the layer's original
        pass are returned.
        """
        local = self._local
        state = local.state if local.owner is not None else None
        if state is None:
            return self._recomputed_gains(position, query, key)
        if local.ratios[position] is not None:
            raise HeadGainError(
                f"decoder layer {self.decoder.layers[position].index} ran twice in one pass; headgain expects one "
                "attention call per decoder layer per forward pass"
            )
        if query.shape[2] != state.num_queries:
            raise HeadGainError(
                f"decoder layer {self.decoder.layers[position].index} received {query.shape[2]} query positions but "
                f"the model call had {state.num_queries}; headgain supports one attention call per layer over the "
                "whole input"
            )
        local.calls += 1
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            ratios = read(state)
            gains = None
            if local.enabled:
                gains = layer_gains(ratios, state.has_visual, local.rules[position])
            if module.training:
                self._records.add(local.pass_id, position, _fingerprint(query, key), gains)
        local.ratios[position] = ratios
        local.gains[position] = gains
        return gains

    def _recomputed_gains(self, position: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            found, gains = self._records.find(position, _fingerprint(query, key))
        if not found:
            layer = self.decoder.layers[position]
            raise HeadGainError(
                f"decoder layer {layer.index} ({layer.name}) ran outside a call of the attached "
                f"{type(self.model).__name__} and matches none of its recent training-mode passes. headgain starts a "
                f"pass when {self._adapter.entry_names(self)} is called; call one of them rather than a layer or "
                "another submodule. Layers recomputed by activation checkpointing are matched to their pass when the "
                f"model ran in training mode (model.train()) within the last {_Records.KEEP} passes"
            )
        return gains

    def _scale(self, position: int, heads: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
        """Heads (B, N, H, D) times the layer's gains (and gates): in place when no gradient
        flows through ``heads``, else out of place (differentiable). Returns the result."""
        gates = self._gates
        if gates is not None:
            gate = gates[position]
            both = gate[None].expand(heads.shape[0], -1) if gains is None else gains * gate
            return ops.scale_heads(heads, both.contiguous())
        if gains is None:
            return heads
        if torch.is_grad_enabled() and heads.requires_grad:
            return ops.scale_heads(heads, gains)
        ops.scale_heads_(heads, gains)
        return heads


_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # forward function -> (signature, **name)


def _arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of one call of ``module`` by parameter name (positional ones and those
    caught by ``**kwargs`` included)."""
    if not args:  # keyword arguments only (as generate() calls models): they are the answer
        return dict(kwargs)
    forward = module.forward
    key = getattr(forward, "__func__", forward)
    known = _SIGNATURES.get(key)
    if known is None:
        signature = inspect.signature(forward)
        extra = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        known = _SIGNATURES[key] = (signature, extra)
    signature, extra = known
    try:
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    except TypeError:  # the forward itself will report the bad call
        return dict(kwargs)
    if extra is not None:
        bound.update(bound.pop(extra, {}))
    return bound


def _adapter_for(decoder: ResolvedDecoder):
    if decoder.kind == "transformers":
        from ..adapters.hf import TransformersAdapter

        return TransformersAdapter()
    from ..adapters.sdpa import SDPAAdapter

    return SDPAAdapter()
