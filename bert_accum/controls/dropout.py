"""Dropout control for gradient-accumulation studies: standard, off, or batch-invariant masks.

Why: with ordinary dropout every mask bit is drawn from torch's RNG stream, so an example's mask
depends on everything drawn before it -- which micro-batch it sits in, its row in that batch, the
padded length, the device and the number of processes. Gradient accumulation over N micro-batches
of B therefore sees different masks than one batch of B*N, and the gradients drift apart for a
reason that has nothing to do with accumulation arithmetic.

Mode ``"invariant"`` removes that cause. A mask bit is a pure function of

    (seed, example id, epoch, dropout site, element position within the example)

computed with integer hashing in torch int64 ops (no torch RNG), so it is identical whatever the
batch composition, batch row, padded length, device or process count. Element positions are
counted from the start of the example, one 16-bit field per trailing dimension:

* hidden states ``[batch, seq, hidden]``      -> (token, hidden index)
* attention probabilities ``[batch, heads, q, k]`` -> (head, q, k)
* pooled output ``[batch, hidden]``             -> (hidden index)

so right padding never moves a real element. Bits are kept with probability ``1 - p`` and kept
values are scaled by ``1 / (1 - p)`` exactly as torch does (``input * (keep / (1 - p))``).

The hash (all arithmetic mod 2**64, i.e. int64 with wrapping multiply; right shifts are made
logical by masking after torch's arithmetic shift)::

    mix64(z)      = splitmix64 finaliser: z ^= z>>>30; z *= M1; z ^= z>>>27; z *= M2; z ^= z>>>31
    site_key      = mix64(mix64(mix64(seed + C_SEED) ^ mix64(epoch + C_EPOCH)) ^ mix64(site + C_SITE))
    example_key   = mix64(site_key ^ mix64(example_id + C_EXAMPLE))
    position_key  = mix64(position * GOLDEN + C_POSITION)          # cached per shape and device
    r             = M2 * xs27(M1 * xs30(example_key + position_key))   # signed int64
    keep          = r < (1 - p) * 2**64 - 2**63                  # (1 - p) * 2**64 is exact in binary

``r`` is the splitmix64 finaliser without its last xor-shift, which only touches the low 33 bits
and so cannot change the outcome of a comparison decided by the high bits (to within 2**-31).
:func:`reference_keep_bit` is a pure-Python twin used by the tests to pin torch's int64 semantics.

Coverage of BERT (transformers 5) -- every dropout of ``BertForSequenceClassification`` and
``BertForMaskedLM`` (the MLM head has none):

* ``bert.embeddings.dropout``                            (site kind EMBEDDINGS)
* attention probabilities: the functional ``nn.functional.dropout`` inside the attention
  function. Reached through transformers' registry: an eager attention function is registered
  with ``AttentionInterface`` under :data:`ATTENTION_NAME` together with the eager mask builder
  under the same name in ``AttentionMaskInterface`` (without it a newly named implementation gets
  no padding mask at all), and the model is switched with ``set_attn_implementation``.
  ``BertSelfAttention.dropout`` (whose ``p`` BERT reads and passes to the function) is replaced
  by an :class:`InvariantDropout` that the function calls.   (ATTN_PROBS, per layer)
* ``encoder.layer.i.attention.output.dropout`` (BertSelfOutput)   (ATTN_OUTPUT, per layer)
* ``encoder.layer.i.output.dropout`` (BertOutput)                 (FFN_OUTPUT, per layer)
* cross-attention equivalents when present                       (CROSS_ATTN_*, per layer)
* any other ``nn.Dropout`` (the classifier head ``dropout``)      (HEAD, numbered in module order)

Usage::

    ctl = DropoutController(model, mode="invariant", seed=1234)
    for micro_batch in micro_batches:
        ctl.set_batch(micro_batch["idx"], epoch)       # before every training forward
        loss = model(**inputs).loss
        loss.backward()
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ATTENTION_NAME",
    "MODES",
    "SiteKind",
    "site_id",
    "DropoutController",
    "InvariantDropout",
    "InvariantDropoutContext",
    "keep_mask",
    "reference_keep_bit",
    "register_invariant_attention",
    "invariant_attention_forward",
]

MODES = ("standard", "off", "invariant")

#: Name under which the invariant-dropout attention (and its mask builder) is registered.
ATTENTION_NAME = "bert_accum_invariant"

# ----------------------------------------------------------------------------------------------
# Hash constants (unsigned 64-bit values; converted to signed int64 for torch)
# ----------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_C_SEED = 0x243F6A8885A308D3  # digits of pi, arbitrary distinct domain separators
_C_EPOCH = 0x13198A2E03707344
_C_SITE = 0xA4093822299F31D0
_C_EXAMPLE = 0x082EFA98EC4E6C89
_C_POSITION = 0x452821E638D01377

_POS_BITS = 16  # bits per trailing dimension in the position code
_MAX_TRAILING_DIMS = 3

#: Elements hashed per chunk on CPU (keeps the int64 temporaries cache-resident).
CPU_CHUNK_ELEMENTS = 1 << 15  # torch's parallel grain size: blocks this small run inline


def _signed(u: int) -> int:
    """Unsigned 64-bit integer -> the int64 with the same bits."""
    u &= _MASK64
    return u - (1 << 64) if u >= (1 << 63) else u


_S_GOLDEN = _signed(_GOLDEN)
_S_M1 = _signed(_M1)
_S_M2 = _signed(_M2)
_S_C_EXAMPLE = _signed(_C_EXAMPLE)
_S_C_POSITION = _signed(_C_POSITION)
_LOW34 = (1 << 34) - 1  # mask after >> 30 (logical shift emulation)
_LOW37 = (1 << 37) - 1  # mask after >> 27
_LOW33 = (1 << 33) - 1  # mask after >> 31


# ----------------------------------------------------------------------------------------------
# Pure-Python reference (unsigned arithmetic mod 2**64)
# ----------------------------------------------------------------------------------------------
def _mix64_py(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _site_key_py(seed: int, epoch: int, site: int) -> int:
    k = _mix64_py(seed + _C_SEED)
    k = _mix64_py(k ^ _mix64_py(epoch + _C_EPOCH))
    return _mix64_py(k ^ _mix64_py(site + _C_SITE))


def _threshold(p: float) -> int:
    """Signed threshold t with P(r < t) = 1 - p for r uniform over int64."""
    t = int((1.0 - float(p)) * 2.0**64) - (1 << 63)  # (1-p)*2**64 is exact in binary floating point
    return max(-(1 << 63), min(t, (1 << 63) - 1))


def _position_code(index: tuple[int, ...]) -> int:
    if len(index) > _MAX_TRAILING_DIMS:
        raise ValueError(f"at most {_MAX_TRAILING_DIMS} dims after the batch dim, got {len(index)}")
    code = 0
    for i in index:
        if not 0 <= i < (1 << _POS_BITS):
            raise ValueError(f"position index {i} outside [0, {1 << _POS_BITS})")
        code = (code << _POS_BITS) | i
    return code


def reference_keep_bit(seed: int, example_id: int, epoch: int, site: int, index: tuple[int, ...], p: float) -> bool:
    """Pure-Python evaluation of one keep bit (the specification the torch code must match).

    ``index`` is the element's position within the example (the indices after the batch dim).
    """
    base = _mix64_py(_site_key_py(seed, epoch, site) ^ _mix64_py(example_id + _C_EXAMPLE))
    pos = _mix64_py(_position_code(tuple(index)) * _GOLDEN + _C_POSITION)
    z = (base + pos) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return _signed(z) < _threshold(p)


# ----------------------------------------------------------------------------------------------
# Torch implementation (int64, wrapping multiply, logical shifts emulated with masks)
# ----------------------------------------------------------------------------------------------
def _xorshift_(z: torch.Tensor, shift: int, low_mask: int, tmp: torch.Tensor) -> None:
    """z ^= (z >>> shift) in place (logical shift on the uint64 bit pattern)."""
    torch.bitwise_right_shift(z, shift, out=tmp)
    tmp.bitwise_and_(low_mask)
    z.bitwise_xor_(tmp)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """In-place splitmix64 finaliser on an int64 tensor."""
    tmp = torch.empty_like(z)
    _xorshift_(z, 30, _LOW34, tmp)
    z.mul_(_S_M1)
    _xorshift_(z, 27, _LOW37, tmp)
    z.mul_(_S_M2)
    _xorshift_(z, 31, _LOW33, tmp)
    return z


def _example_keys(seed: int, epoch: int, site: int, example_ids: torch.Tensor) -> torch.Tensor:
    """int64 key per example for one (seed, epoch, site): shape [batch]."""
    site_key = _signed(_site_key_py(int(seed), int(epoch), int(site)))
    z = example_ids.to(torch.int64).add(_S_C_EXAMPLE)  # wraps mod 2**64
    z = _mix64_(z)
    z.bitwise_xor_(site_key)
    return _mix64_(z)


_POSITION_TABLES: dict[tuple[str, int], torch.Tensor] = {}
_POSITION_FLAT: OrderedDict[tuple[str, tuple[int, ...]], torch.Tensor] = OrderedDict()
#: Byte budget of the per-shape contiguous position tables (least recently used evicted first).
POSITION_CACHE_BYTES = 64 << 20


def _position_keys(trailing: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """mix64(position_code * GOLDEN + C_POSITION) for every position of ``trailing``, flat and contiguous.

    Position codes do not depend on the size of the tensor, so one table per (device, ndim) is
    grown to the largest shape seen and sliced; the contiguous slice is cached per exact shape.
    """
    k = len(trailing)
    if k == 0 or k > _MAX_TRAILING_DIMS:
        raise ValueError(f"invariant dropout needs 1..{_MAX_TRAILING_DIMS} dims after the batch dim, got {k}")
    if max(trailing) > (1 << _POS_BITS):
        raise ValueError(f"invariant dropout supports dims up to {1 << _POS_BITS}, got shape {trailing}")
    flat_key = (str(device), tuple(trailing))
    flat = _POSITION_FLAT.get(flat_key)
    if flat is not None:
        _POSITION_FLAT.move_to_end(flat_key)
        return flat
    key = (str(device), k)
    table = _POSITION_TABLES.get(key)
    if table is None or any(have < want for have, want in zip(table.shape, trailing)):
        shape = trailing if table is None else tuple(max(a, b) for a, b in zip(table.shape, trailing))
        code = torch.zeros((1,) * k, dtype=torch.int64, device=device)
        for dim, size in enumerate(shape):
            view = [1] * k
            view[dim] = size
            shift = _POS_BITS * (k - 1 - dim)
            code = code + (torch.arange(size, dtype=torch.int64, device=device) << shift).view(view)
        code = code.mul_(_S_GOLDEN).add_(_S_C_POSITION)
        table = _mix64_(code.contiguous())
        _POSITION_TABLES[key] = table
    flat = table[tuple(slice(0, n) for n in trailing)].contiguous().view(-1)
    _POSITION_FLAT[flat_key] = flat
    while len(_POSITION_FLAT) > 1 and sum(t.numel() * 8 for t in _POSITION_FLAT.values()) > POSITION_CACHE_BYTES:
        _POSITION_FLAT.popitem(last=False)
    return flat


_SCRATCH = threading.local()


def _scratch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int64 work buffers of n elements (on CPU reused per thread, avoiding allocator churn)."""
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, dtype=torch.int64, device=device)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < 2 * n:
        buf = _SCRATCH.buf = torch.empty(2 * n, dtype=torch.int64)
    return buf[:n], buf[n : 2 * n]


def _fill_keep(
    out: torch.Tensor,
    seed: int,
    epoch: int,
    site: int,
    example_ids: torch.Tensor,
    p: float,
    divide_by: float | None = None,
) -> torch.Tensor:
    """Write keep bits (0/1 in ``out``'s dtype, then optionally ``/ divide_by``) for ``out`` = [batch, *trailing].

    On CPU the work is cut into blocks of at most :data:`CPU_CHUNK_ELEMENTS` elements: the int64
    temporaries stay cache-resident and, below torch's parallel grain size, each op runs inline
    without an OpenMP region (on shared, oversubscribed cores every parallel region can cost a
    scheduler time slice). Blocking never changes a bit: each one is a function of its own index.
    """
    if not out.is_contiguous():
        raise ValueError("_fill_keep needs a contiguous output tensor")
    batch, trailing = out.shape[0], tuple(out.shape[1:])
    device = out.device
    ids = example_ids.to(device=device, dtype=torch.int64)
    base = _example_keys(seed, epoch, site, ids).view(batch, 1)
    pos = _position_keys(trailing, device).view(1, -1)
    per_example = pos.shape[1]
    flat_out = out.view(batch, per_example)
    threshold = _threshold(p)
    if device.type == "cpu":
        cols = min(per_example, CPU_CHUNK_ELEMENTS)
        rows = max(1, min(batch, CPU_CHUNK_ELEMENTS // per_example)) if per_example <= CPU_CHUNK_ELEMENTS else 1
    else:
        rows, cols = batch, per_example
    z_buf, tmp_buf = _scratch(device, rows * cols)
    for b0 in range(0, batch, rows):
        b1 = min(batch, b0 + rows)
        for e0 in range(0, per_example, cols):
            e1 = min(per_example, e0 + cols)
            n = (b1 - b0) * (e1 - e0)
            z = z_buf[:n].view(b1 - b0, e1 - e0)
            tmp = tmp_buf[:n].view(b1 - b0, e1 - e0)
            torch.add(base[b0:b1], pos[:, e0:e1], out=z)  # wrapping add
            _xorshift_(z, 30, _LOW34, tmp)
            z.mul_(_S_M1)
            _xorshift_(z, 27, _LOW37, tmp)
            z.mul_(_S_M2)
            block = flat_out[b0:b1, e0:e1]
            torch.lt(z, threshold, out=block)  # 0/1 straight into out's dtype
            if divide_by is not None:
                block.div_(divide_by)
    return out


def keep_mask(
    seed: int,
    example_ids: torch.Tensor,
    epoch: int,
    site: int,
    trailing_shape: tuple[int, ...],
    p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean keep mask of shape ``[len(example_ids), *trailing_shape]`` (True = keep).

    A pure function of its arguments: row ``b`` depends only on ``example_ids[b]`` and the
    position within ``trailing_shape``, never on the other rows or on the size of the tensor.
    """
    example_ids = torch.as_tensor(example_ids, dtype=torch.int64)
    device = torch.device(device) if device is not None else example_ids.device
    out = torch.empty((example_ids.numel(), *trailing_shape), dtype=torch.bool, device=device)
    return _fill_keep(out, seed, epoch, site, example_ids.reshape(-1), p)


# ----------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------
class SiteKind:
    """Kinds of dropout site; the site id is ``kind * 1024 + index`` (index = layer or head number)."""

    EMBEDDINGS = 1
    ATTN_PROBS = 2
    ATTN_OUTPUT = 3
    FFN_OUTPUT = 4
    CROSS_ATTN_PROBS = 5
    CROSS_ATTN_OUTPUT = 6
    HEAD = 7


def site_id(kind: int, index: int = 0) -> int:
    """Integer id of a dropout site."""
    if not 0 <= index < 1024:
        raise ValueError(f"site index {index} outside [0, 1024)")
    return int(kind) * 1024 + int(index)


_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.(.+)$")


def _classify_site(name: str) -> tuple[int, int] | None:
    """(kind, layer) for a known BERT-family dropout name, else None (head/other)."""
    if name == "embeddings.dropout" or name.endswith(".embeddings.dropout"):
        return SiteKind.EMBEDDINGS, 0
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    return {
        "attention.self.dropout": (SiteKind.ATTN_PROBS, layer),
        "attention.output.dropout": (SiteKind.ATTN_OUTPUT, layer),
        "output.dropout": (SiteKind.FFN_OUTPUT, layer),
        "crossattention.self.dropout": (SiteKind.CROSS_ATTN_PROBS, layer),
        "crossattention.output.dropout": (SiteKind.CROSS_ATTN_OUTPUT, layer),
    }.get(rest)


# ----------------------------------------------------------------------------------------------
# Per-batch context and the dropout module
# ----------------------------------------------------------------------------------------------
@dataclass
class InvariantDropoutContext:
    """What the masks of the current batch are a function of; shared by all sites of one model."""

    seed: int
    example_ids: torch.Tensor | None = None
    epoch: int = 0
    strict: bool = True
    consumed: bool = False
    _ids_on: dict[str, torch.Tensor] = field(default_factory=dict)

    def set_batch(self, example_ids, epoch: int) -> None:
        """Name the examples (1-D integer ids, one per row) and epoch of the next training forward."""
        ids = torch.as_tensor(example_ids)
        if ids.dim() != 1:
            raise ValueError(f"example_ids must be a 1-D tensor [batch], got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"example_ids must be integers, got {ids.dtype}")
        self.example_ids = ids.detach().to(torch.int64)
        self.epoch = int(epoch)
        self.consumed = False
        self._ids_on = {str(self.example_ids.device): self.example_ids}

    def ids_for(self, batch_size: int, device: torch.device, where: str) -> torch.Tensor:
        """The current batch's example ids on `device`; raises if none were set or their count is not `batch_size`."""
        if self.example_ids is None:
            raise RuntimeError(
                f"invariant dropout at {where}: training forward without a batch context; call "
                "DropoutController.set_batch(example_ids, epoch) before every training forward"
            )
        if self.example_ids.numel() != batch_size:
            raise RuntimeError(
                f"invariant dropout at {where}: the forward has batch size {batch_size} but set_batch "
                f"was last given {self.example_ids.numel()} example ids; call set_batch(example_ids, epoch) "
                "for this batch before its forward (stale ids are never reused)"
            )
        key = str(device)
        ids = self._ids_on.get(key)
        if ids is None:
            ids = self._ids_on[key] = self.example_ids.to(device)
        return ids


class InvariantDropout(nn.Dropout):
    """Drop-in for ``nn.Dropout`` whose masks are a pure function of (seed, example, epoch, site, position).

    Behaves like ``nn.Dropout`` (identity in eval mode or at p=0; ``input * (keep / (1 - p))`` in
    training), but the keep bits come from :func:`keep_mask`. Dim 0 of the input is the batch dim;
    the remaining dims (at most 3, each < 65536) are the element position within the example.
    """

    def __init__(self, site: int, p: float, context: InvariantDropoutContext, name: str = ""):
        super().__init__(p=p, inplace=False)
        self.site = int(site)
        self.context = context
        self.site_name = name

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"

    def forward(self, input: torch.Tensor, p: float | None = None) -> torch.Tensor:  # noqa: A002
        p = self.p if p is None else float(p)
        if not self.training or p == 0.0:
            return input
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if p == 1.0:
            return input * torch.zeros((), dtype=input.dtype, device=input.device)
        ids = self.context.ids_for(input.shape[0], input.device, self.site_name or f"site {self.site}")
        noise = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        # same arithmetic as torch's dropout: input * (mask / (1 - p))
        _fill_keep(noise, self.context.seed, self.context.epoch, self.site, ids, p, divide_by=1.0 - p)
        return input * noise


# ----------------------------------------------------------------------------------------------
# Attention function (registered in transformers' AttentionInterface)
# ----------------------------------------------------------------------------------------------
def invariant_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """BERT's eager attention with the probability dropout done by ``module.dropout`` (an InvariantDropout)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(
                attention_mask,
                torch.zeros((), dtype=attn_weights.dtype, device=attn_weights.device),
                torch.finfo(attn_weights.dtype).min,
            )
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    if module.training and dropout > 0.0:
        site = getattr(module, "dropout", None)
        if not isinstance(site, InvariantDropout):
            raise RuntimeError(
                f"attention implementation {ATTENTION_NAME!r} needs an InvariantDropout at "
                f"{type(module).__name__}.dropout; install it with DropoutController(model, 'invariant', seed)"
            )
        attn_weights = site(attn_weights, p=dropout)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def register_invariant_attention() -> str:
    """Register the attention function and its mask builder under :data:`ATTENTION_NAME` (idempotent).

    transformers 5 builds the padding mask only for implementation names known to
    ``AttentionMaskInterface``; a name registered only in ``AttentionInterface`` silently gets
    ``attention_mask=None`` and attends to padding. The eager builder (float mask with 0 / dtype
    min, matching the additive use above) is registered under the same name.
    """
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, invariant_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME


# ----------------------------------------------------------------------------------------------
# Controller
# ----------------------------------------------------------------------------------------------
class DropoutController:
    """Installs a dropout mode on a model and carries the per-batch context.

    * ``"standard"``: the model is left untouched (torch RNG dropout).
    * ``"off"``: every dropout probability (modules and the attention one, which BERT reads from
      ``BertSelfAttention.dropout.p``) is set to 0; the model stays in train mode.
    * ``"invariant"``: every ``nn.Dropout`` is replaced by an :class:`InvariantDropout` with its
      own site id and the attention implementation is switched to :data:`ATTENTION_NAME`.

    ``set_batch(example_ids, epoch)`` must precede every training-mode forward (it is accepted and
    ignored in the other modes). Under ``"invariant"`` a training forward whose batch size differs
    from the ids given raises; with ``strict=True`` (default) so does a second training forward of
    the whole model without a new ``set_batch`` (recomputation inside gradient checkpointing is
    not a model forward and reuses the ids, giving identical masks). Eval mode never drops.

    ``sites`` maps module names to site ids (invariant), ``disabled`` lists the modules set to
    p=0 (off); ``remove()`` restores the model.
    """

    def __init__(self, model: nn.Module, mode: str, seed: int = 0, strict: bool = True):
        if mode not in MODES:
            raise ValueError(f"dropout mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.seed = int(seed)
        self.context = InvariantDropoutContext(seed=self.seed, strict=strict)
        self.sites: dict[str, int] = {}  # invariant mode: module name -> site id
        self.disabled: list[str] = []  # off mode: dropout modules whose p was set to 0
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []
        self._restore_p: list[tuple[nn.Module, float]] = []
        self._hooks: list = []
        self._old_attn: str | None = None
        self._installed = False
        if mode == "off":
            self._install_off()
        elif mode == "invariant":
            self._install_invariant()
        self._installed = True

    # -- installation -----------------------------------------------------------------------
    def _dropout_modules(self) -> list[tuple[str, nn.Dropout]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]

    def _install_off(self) -> None:
        for name, mod in self._dropout_modules():
            self._restore_p.append((mod, mod.p))
            mod.p = 0.0
            self.disabled.append(name)

    def _install_invariant(self) -> None:
        found = self._dropout_modules()
        if any(isinstance(m, InvariantDropout) for _, m in found):
            raise RuntimeError("the model already has invariant dropout installed; call remove() on its controller")
        head_index = 0
        for name, mod in found:
            if type(mod) is not nn.Dropout:
                raise TypeError(f"{name}: {type(mod).__name__} is not supported by invariant dropout (nn.Dropout only)")
            known = _classify_site(name)
            if known is None:
                sid = site_id(SiteKind.HEAD, head_index)
                head_index += 1
            else:
                sid = site_id(*known)
            if sid in self.sites.values():
                raise RuntimeError(f"duplicate dropout site id {sid} at {name}")
            self.sites[name] = sid
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            new = InvariantDropout(sid, mod.p, self.context, name=name)
            new.train(mod.training)
            setattr(parent, child, new)
            self._restore.append((parent, child, mod))

        config = getattr(self.model, "config", None)
        if config is None:
            raise TypeError("invariant dropout needs a transformers model (with .config) for the attention dropout")
        register_invariant_attention()
        self._old_attn = config._attn_implementation
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(ATTENTION_NAME)
        if config._attn_implementation != ATTENTION_NAME:
            config._attn_implementation = ATTENTION_NAME
        for sub in self.model.modules():  # every sub-config (shared in BERT) must dispatch to us
            sub_cfg = getattr(sub, "config", None)
            if sub_cfg is not None and getattr(sub_cfg, "_attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
                raise RuntimeError(f"{type(sub).__name__} did not switch to attention {ATTENTION_NAME!r}")

        self._hooks.append(self.model.register_forward_pre_hook(self._pre_forward))
        self._hooks.append(self.model.register_forward_hook(self._post_forward))

    def _pre_forward(self, module, args):
        if not module.training:
            return None
        ctx = self.context
        if ctx.example_ids is None:
            raise RuntimeError(
                "invariant dropout: training forward without set_batch(example_ids, epoch); "
                "call it before every training forward"
            )
        if ctx.strict and ctx.consumed:
            raise RuntimeError(
                "invariant dropout: a second training forward without a new set_batch(example_ids, epoch); "
                "refusing to reuse the previous batch's example ids (pass strict=False to allow it)"
            )
        return None

    def _post_forward(self, module, args, output):
        if module.training:
            self.context.consumed = True
        return None

    # -- per-batch context ------------------------------------------------------------------
    def set_batch(self, example_ids, epoch: int) -> None:
        """Set the example ids (``[batch]`` integers, the rows of the next forward) and the epoch."""
        self.context.set_batch(example_ids, epoch)

    @contextlib.contextmanager
    def batch(self, example_ids, epoch: int) -> Iterator[None]:
        """``with ctl.batch(ids, epoch): loss = model(...).loss; loss.backward()`` -- clears afterwards."""
        self.set_batch(example_ids, epoch)
        try:
            yield
        finally:
            self.context.example_ids = None
            self.context._ids_on = {}

    # -- removal ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo the installation (restore modules, probabilities, attention implementation, hooks)."""
        if not self._installed:
            return
        for h in self._hooks:
            h.remove()
        for parent, child, mod in reversed(self._restore):
            setattr(parent, child, mod)
        for mod, p in self._restore_p:
            mod.p = p
        if self._old_attn is not None:
            if hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation(self._old_attn)
            else:
                self.model.config._attn_implementation = self._old_attn
        self._hooks, self._restore, self._restore_p, self._old_attn = [], [], [], None
        self._installed = False

    def __repr__(self) -> str:
        return f"DropoutController(mode={self.mode!r}, seed={self.seed}, sites={len(self.sites)})"
