"""Attention capture: record what the UNet attends to while it generates.

diffusers' `Attention` module delegates its computation to a processor object. We
install a `CaptureProcessor` around each wanted layer's own processor with
`unet.set_attn_processor`, and put the originals back when the context exits:

    with capture_attention(pipe.unet, CaptureConfig(), batch_size=2, cfg=True, latent_hw=(64, 64)) as store:
        images = pipe(prompts, ...).images
    maps = store.results()          # one SampleAttention per sample

The wrapped processor computes the layer output itself, so images stay bitwise
identical; the probabilities are recomputed beside it from `to_q`/`to_k`, for the
conditional half of the batch only, in row chunks (bounded memory), averaged over
heads and summed into fixed-size accumulators (memory flat in the number of steps).
"""
from __future__ import annotations

import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .tokens import ClassSpec


@dataclass
class SampleAttention:
    """What capture recorded for one sample, averaged over heads and captured steps (conditional half).

    cross:  layer name -> (n_tokens, h, w) cross-attention probabilities of every prompt token.
    self_attn: resolution side h -> (h*w, h*w) self-attention, mean over the captured layers of that side;
            row i is where query pixel i attends (rows sum to 1).
    cross_resolution: layer name -> h, for selecting layers by resolution.
    features: optional named UNet feature maps (C, h, w), e.g. for DiffCut.
    self_attn_layers: layer name -> (h*w, h*w), each layer on its own (diagnostics only).
    """

    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_resolution: dict[str, int] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attn_layers: dict[str, torch.Tensor] = field(default_factory=dict)  # only with per_layer_self

    def class_cross_attention(self, spec: ClassSpec, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Per layer, the cross-attention of a class: the sum over its seed tokens, (h, w)."""
        names = layers if layers is not None else list(self.cross)
        idx = list(spec.token_indices)
        return {n: self.cross[n][idx].sum(0) for n in names}


@dataclass
class CaptureConfig:
    """What to record.

    cross: record cross-attention of every prompt token in the cross-attention layers (cheap).
    cross_sides: only the cross-attention layers at these resolution sides; None records all of them.
    self_blocks: resolution side -> UNet block kinds ("down", "mid", "up") whose self-attention is
        averaged into that side's map. None records every side from every block; sides not listed
        are not recorded (their probabilities are never computed).
    steps: the window of denoising steps recorded, as fractions [start, end) of the schedule.
    side_steps: resolution side -> a narrower window for that side's self-attention (fractions of the
        whole schedule, applied within `steps`): e.g. SD's 64x64 layers, whose recording costs most,
        only in the last steps. Sides not listed use `steps`.
    chunk_elements: upper bound on the elements of one probability chunk (rows x keys x heads x batch);
        None: 2^19 on CPU (about a core's L2 cache), 2^24 on accelerators (fewer kernel launches).
    feature_modules: name -> dotted UNet module path whose output is kept (last recorded step), e.g. for DiffCut.
    """

    cross: bool = True
    cross_sides: tuple[int, ...] | None = None
    self_blocks: dict[int, tuple[str, ...]] | None = None
    steps: tuple[float, float] = (0.0, 1.0)
    side_steps: dict[int, tuple[float, float]] | None = None
    chunk_elements: int | None = None
    feature_modules: dict[str, str] = field(default_factory=dict)
    per_layer_self: bool = False  # also keep each layer's own self-attention (diagnostics, e.g. toyworld eval)

    def wants_self(self, side: int, block: str) -> bool:
        if self.self_blocks is None:
            return True
        return block in self.self_blocks.get(side, ())


def layer_block(name: str) -> str:
    """'up_blocks.1.attentions.0...' -> 'up'; 'mid_block...' -> 'mid'."""
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, head)


class AttentionStore:
    """Fixed-size accumulators, summed over the recorded steps and layers."""

    def __init__(self, config: CaptureConfig, batch_size: int, cfg: bool, latent_hw: tuple[int, int],
                 num_steps: int):
        self.config = config
        self.batch_size = batch_size
        self.cfg = cfg
        self.latent_hw = latent_hw
        self._first, self._last = _step_range(config.steps, num_steps)
        self._side_ranges = {side: _step_range(w, num_steps) for side, w in (config.side_steps or {}).items()}
        self.step = -1
        self.cross: dict[str, torch.Tensor] = {}
        self.cross_count: dict[str, int] = {}
        self.cross_side: dict[str, int] = {}
        self.self_attn: dict[int, torch.Tensor] = {}
        self.self_count: dict[int, int] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.layer_self: dict[str, torch.Tensor] = {}
        self.layer_count: dict[str, int] = {}
        self.seconds = 0.0  # wall time spent recording (inside the UNet's forward), for the shard's time split
        self.cpu_by_kind: dict[str, float] = {}  # "self 64", "cross 16" -> CPU seconds of this thread recording them
        self._finished = False

    # -- step bookkeeping: one UNet forward = one denoising step
    def next_step(self) -> None:
        self.step += 1

    @property
    def recording(self) -> bool:
        return self._first <= self.step < self._last

    def records_side(self, side: int) -> bool:
        """Whether this step records the self-attention of `side` (its own window, if it has one)."""
        first, last = self._side_ranges.get(side, (self._first, self._last))
        return first <= self.step < last

    def side_of(self, seq_len: int) -> tuple[int, int]:
        """(h, w) of a layer from its sequence length and the latent shape."""
        lh, lw = self.latent_hw
        factor = math.sqrt(lh * lw / seq_len)
        return round(lh / factor), round(lw / factor)

    def conditional(self, x: torch.Tensor) -> torch.Tensor:
        # With classifier-free guidance diffusers batches [unconditional, conditional].
        return x[x.shape[0] // 2 :] if self.cfg else x

    def add_cross(self, name: str, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        """probs: (B, n_query, n_tokens), mean over heads."""
        p = probs.transpose(1, 2).float()  # (B, tokens, hw)
        if name in self.cross:
            self.cross[name] += p
            self.cross_count[name] += 1
        else:
            self.cross[name], self.cross_count[name], self.cross_side[name] = p.clone(), 1, hw[0]

    def self_accumulator(self, side: int, n: int, device, ) -> torch.Tensor:
        if side not in self.self_attn:
            self.self_attn[side] = torch.zeros(self.batch_size, n, n, device=device, dtype=torch.float32)
            self.self_count[side] = 0
        return self.self_attn[side]

    def results(self) -> list[SampleAttention]:
        """One SampleAttention per sample: averages over the recorded steps and layers (on CPU).

        The accumulators are divided in place and each sample gets views of its rows, not copies:
        the batch's maps live once, and are freed when the store and the last sample are dropped.
        Call once (a second call would divide again).
        """
        if self._finished:
            raise RuntimeError("AttentionStore.results() was already called")
        self._finished = True
        for accs, counts in ((self.cross, self.cross_count), (self.self_attn, self.self_count),
                             (self.layer_self, self.layer_count)):
            for key, acc in accs.items():
                acc.div_(counts[key])
        out = []
        for b in range(self.batch_size):
            cross, res = {}, {}
            for name, acc in self.cross.items():
                h = self.cross_side[name]
                w = acc.shape[-1] // h
                cross[name] = acc[b].reshape(-1, h, w).cpu()
                res[name] = h
            self_attn = {s: acc[b].cpu() for s, acc in self.self_attn.items()}
            feats = {k: v[b].float().cpu() for k, v in self.features.items()}
            layers = {n: acc[b].cpu() for n, acc in self.layer_self.items()}
            out.append(SampleAttention(cross=cross, self_attn=self_attn, cross_resolution=res, features=feats,
                                       self_attn_layers=layers))
        return out


def _step_range(window: tuple[float, float], num_steps: int) -> tuple[int, int]:
    """Fractions [start, end) of the schedule -> step indices [first, last), at least one step."""
    first = int(math.floor(window[0] * num_steps))
    return first, max(first + 1, int(math.ceil(window[1] * num_steps)))


CPU_CHUNK_ELEMENTS = 1 << 19
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


def attention_probabilities(attn, query_states: torch.Tensor, key_states: torch.Tensor,
                            chunk_elements: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-over-heads softmax(QK^T * scale), computed in row chunks.

    query_states: (B, N, C) input of to_q; key_states: (B, M, C_kv) input of to_k.
    Adds into `out` (B, N, M) if given, else returns a new tensor.

    Speed (this runs beside every recorded layer): the scale is folded into q, the chunk's scores and
    probabilities live in two buffers allocated once and reused (`out=`), and each chunk is used while
    it is still in cache. On CPU, chunks of about 2^19 elements (2 MB, a core's L2) ran 2-3x faster
    than 2^24 on SD1.5's 64x64 layers (the 64 MB temporaries of a big chunk are fresh pages each
    time). The layer's output is not touched.
    """
    q = attn.to_q(query_states)
    k = attn.to_k(key_states)
    b, n, inner = q.shape
    heads = attn.heads
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    m = k.shape[2]
    q = (q.float() * attn.scale).reshape(b * heads, n, d)
    kt = k.float().transpose(-1, -2).reshape(b * heads, d, m)
    if out is None:
        out = torch.zeros(b, n, m, device=q.device, dtype=torch.float32)
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if q.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    rows = min(n, max(1, chunk_elements // max(1, b * heads * m)))
    scores = torch.empty(b * heads, rows, m, device=q.device, dtype=torch.float32)
    probs = torch.empty_like(scores)
    for i in range(0, n, rows):
        r = min(rows, n - i)
        s, p = scores[:, :r], probs[:, :r]
        torch.bmm(q[:, i : i + r], kt, out=s)
        torch.softmax(s, -1, out=p)
        out[:, i : i + r].add_(p.view(b, heads, r, m).sum(1), alpha=1.0 / heads)
    return out


class CaptureProcessor:
    """Wraps a layer's own processor: the output comes from it unchanged; probabilities are recorded beside."""

    def __init__(self, inner, name: str, store: AttentionStore, is_cross: bool):
        self.inner = inner
        self.name = name
        self.store = store
        self.is_cross = is_cross
        self.block = layer_block(name)

    @classmethod
    def wrapping(cls, inner, name: str, store: AttentionStore, is_cross: bool) -> "CaptureProcessor":
        """A CaptureProcessor whose `__call__` shows `inner`'s signature.

        diffusers' Attention passes on only the `cross_attention_kwargs` that the processor's signature
        names (and drops the rest), so a bare `**kwargs` would silently drop e.g. IP-Adapter masks.
        """
        return _capture_class(type(inner))(inner, name, store, is_cross)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        if self.store.recording:
            started, cpu = time.perf_counter(), time.thread_time()
            bound = self._bind(attn, hidden_states, *args, **kwargs)
            with torch.no_grad():
                kind = self._record(attn, hidden_states, bound.get("encoder_hidden_states"))
            self.store.seconds += time.perf_counter() - started
            if kind:
                self.store.cpu_by_kind[kind] = self.store.cpu_by_kind.get(kind, 0.0) + time.thread_time() - cpu
        return out

    def _bind(self, attn, hidden_states, *args, **kwargs) -> dict:
        if not args:
            return kwargs
        names = list(inspect.signature(self.inner.__call__).parameters)[2:]  # after (attn, hidden_states)
        return {**dict(zip(names, args)), **kwargs}

    def _record(self, attn, hidden_states, encoder_hidden_states) -> str | None:
        """Record this layer's probabilities if wanted; returns what was recorded ("self 64"), else None."""
        store = self.store
        x = hidden_states
        if x.ndim == 4:  # (B, C, H, W) blocks: flatten as the default processor does
            x = x.flatten(2).transpose(1, 2)
        if attn.spatial_norm is not None or attn.group_norm is not None:
            return None  # VAE-style attention; SD UNet transformer blocks have neither
        hw = store.side_of(x.shape[1])
        x = store.conditional(x)
        if self.is_cross:
            sides = store.config.cross_sides
            if not store.config.cross or encoder_hidden_states is None or (sides is not None and hw[0] not in sides):
                return None
            ctx = store.conditional(encoder_hidden_states)
            if attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            probs = attention_probabilities(attn, x, ctx, store.config.chunk_elements)
            store.add_cross(self.name, probs, hw)
            return f"cross {hw[0]}"
        else:
            if not store.config.wants_self(hw[0], self.block) or not store.records_side(hw[0]):
                return None
            acc = store.self_accumulator(hw[0], x.shape[1], x.device)
            if store.config.per_layer_self:
                probs = attention_probabilities(attn, x, x, store.config.chunk_elements)
                acc += probs
                if self.name in store.layer_self:
                    store.layer_self[self.name] += probs
                    store.layer_count[self.name] += 1
                else:
                    store.layer_self[self.name], store.layer_count[self.name] = probs, 1
            else:
                attention_probabilities(attn, x, x, store.config.chunk_elements, out=acc)
            store.self_count[hw[0]] += 1
            return f"self {hw[0]}"


@lru_cache(maxsize=None)
def _capture_class(inner_cls: type) -> type:
    """CaptureProcessor subclass whose `__call__` carries `inner_cls.__call__`'s signature."""
    def __call__(self, attn, hidden_states, *args, **kwargs):
        return CaptureProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__.__signature__ = inspect.signature(inner_cls.__call__)
    return type(f"Capture{inner_cls.__name__}", (CaptureProcessor,), {"__call__": __call__})


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


@contextmanager
def capture_attention(unet, config: CaptureConfig, batch_size: int, cfg: bool, latent_hw: tuple[int, int],
                      num_steps: int = 1):
    """Install capture processors on `unet` for the duration of the block; yields the AttentionStore."""
    store = AttentionStore(config, batch_size, cfg, latent_hw, num_steps)
    originals = dict(unet.attn_processors)
    wrapped = {}
    for key, proc in originals.items():
        name = key.removesuffix(".processor")
        kind = name.rsplit(".", 1)[-1]
        wrapped[key] = proc if kind not in ("attn1", "attn2") else \
            CaptureProcessor.wrapping(proc, name, store, is_cross=(kind == "attn2"))
    hooks = [unet.register_forward_pre_hook(lambda *_: store.next_step())]
    for fname, path in config.feature_modules.items():
        def keep(_m, _inp, output, fname=fname):
            if store.recording:
                t = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                t = store.conditional(t.detach())
                if t.ndim == 3:  # (B, N, C) -> (B, C, h, w)
                    h, w = store.side_of(t.shape[1])
                    t = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
                store.features[fname] = t.float()
        hooks.append(_module(unet, path).register_forward_hook(keep))
    unet.set_attn_processor(wrapped)
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)
        for h in hooks:
            h.remove()
