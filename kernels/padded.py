"""`attnfx::padded_attention`: key padding proven from the graph, dispatched on the data at run time.

The matcher proves "causal (or not) + key padding read from attention_mask", but only the data says
whether a batch is padded. This op looks at the (B, N) key-keep mask, O(B*N) against O(N^2) work:

  * every key kept       -> one attention call with no mask (SDPA `is_causal` where it can);
  * each row keeps one contiguous run [lo, hi) of keys (right padding: a prefix, left padding: a
    suffix) -> padding-free: rows with the same run share one call on q[:, :, qa:] and
    k, v[:, :, lo:hi] (qa: the first query that sees a kept key), so padded keys cost nothing;
  * anything else        -> one dense call with the mask.

    attnfx::padded_attention(q, k, v, key_keep, bias?, alibi_slopes?, scale, causal, window,
                             softcap, fill) -> out (B, H, M, F)

Semantics are attnfx::attention's with the mask `key_keep[b, n]` (bool, (B, N) or (B, 1, 1, N);
True attends) and `fill`, the additive value every excluded score receives, band or padding alike
(-inf for a bool/-inf mask; Hugging Face's finfo.min). It matters only for query rows that keep
no key: with -inf they are 0 (as attnfx::attention), with a finite fill they are what the model
computes, softmax over all N keys of (score + fill) in q's dtype: for an absorbing fill such as
finfo.min that is the mean of V. The sliced calls realign the diagonal: for rows [qa, M) and keys
[lo, hi) the offset is qa + offset - lo, which is top-left or bottom-right for right and left
padding of self-attention and for decoding; a group where it is neither runs the dense call.
Backward recomputes this forward under autograd (every path is differentiable), so training is
exact, at about the cost of one extra forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from attnfx.cost_model.spec import SCORE_ARGS, AttentionSpec, Causal, Kind, MaskInput, ScoreMods

from . import attention_ops  # noqa: F401  (registers attnfx::attention, the kernel for what SDPA cannot take)
from .attention_args import Dims, accumulation_dtype, bias_4d, check_args, decode_op_args
from .variant import Call, CallSite, Operands, call_arguments, calls_op, kind_refusal, untaken_modifier

PADDED_OP = "attnfx::padded_attention"

# The score arguments its schema spells out (its slicing realigns each of them), and the optional
# score terms it computes: a new term is refused here until the padding-free path handles it.
SCORE_ARGS_TAKEN = ("scale", "causal", "window", "softcap")
TAKES = ("softcap", "alibi")


@dataclass(frozen=True)
class Mods:
    """The score modifiers of one call, as every path reads them."""

    scale: float
    causal: str
    window: int
    softcap: float
    fill: float


@dataclass(frozen=True)
class KeyPlan:
    """The run-time decision: which path, and for padding-free the kept run [lo, hi) of each row."""

    path: str
    lo: tuple[int, ...] = ()
    hi: tuple[int, ...] = ()

    def runs(self, batch: int, kv_len: int) -> list[tuple[int, int]]:
        """Each batch row's kept run [lo, hi) (all keys when every key is kept)."""
        return [(0, kv_len)] * batch if self.path == "all_kept" else list(zip(self.lo, self.hi))


def plan_keys(key_keep: Tensor) -> KeyPlan:
    """Classify a (B, N) keep mask in O(B*N): all kept, one contiguous run per row, or neither."""
    keep = key_keep.reshape(key_keep.shape[0], key_keep.shape[-1]).to(torch.bool)
    if bool(keep.all()):
        return KeyPlan("all_kept")
    n = keep.shape[1]
    kept = keep.sum(1)
    position = torch.arange(n, device=keep.device)
    lo = torch.where(keep, position, n).amin(1)
    hi = torch.where(keep, position + 1, 0).amax(1)
    empty = kept == 0
    if not bool(((hi - lo == kept) | empty).all()):
        return KeyPlan("dense")
    lo, hi = torch.where(empty, 0, lo), torch.where(empty, 0, hi)
    return KeyPlan("padding_free", tuple(lo.tolist()), tuple(hi.tolist()))


def _sdpa_takes(mods: Mods, slopes: Tensor | None, causal: str, q_len: int, kv_len: int,
                bias: Tensor | None) -> bool:
    if mods.softcap or slopes is not None or mods.window != -1:
        return False
    if not Causal(causal).hides_keys(q_len):
        return True
    return bias is None and (causal == "top_left" or q_len == kv_len)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, slopes: Tensor | None, mods: Mods,
            causal: str) -> Tensor:
    """One attention call without key masking: SDPA's flag path where it can, else attnfx::attention."""
    if _sdpa_takes(mods, slopes, causal, q.shape[2], k.shape[2], bias):
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=Causal(causal).hides_keys(q.shape[2]),
                                              scale=mods.scale, enable_gqa=q.shape[1] != k.shape[1])
    out, _ = torch.ops.attnfx.attention(q, k, v, bias, slopes, mods.scale, causal, mods.window,
                                        mods.softcap)
    return out


def _offset(mods: Mods, q_len: int, kv_len: int) -> int | None:
    return None if mods.causal == "none" else Causal(mods.causal).offset(q_len, kv_len)


def _sliced_causal(offset: int | None, rows: int, keys: int) -> str | None:
    """The diagonal of a sliced call whose key n' is visible from query m' when n' <= m' + offset."""
    if offset is None:
        return "none"
    if offset == 0:
        return "top_left"
    if offset == keys - rows:
        return "bottom_right"
    return None


def _slice_bias(bias: Tensor | None, rows: Tensor, qa: int, lo: int, hi: int) -> Tensor | None:
    if bias is None:
        return None
    b = bias_4d(bias)
    b = b.index_select(0, rows) if b.shape[0] > 1 else b
    return b[:, :, qa if b.shape[2] > 1 else 0:, lo:hi if b.shape[3] > 1 else None]


def _padding_free(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, bias: Tensor | None, slopes: Tensor | None,
                  mods: Mods, plan: KeyPlan, out: Tensor) -> None:
    """Rows sharing one kept run [lo, hi) attend in one call over those keys only; a group whose
    realigned diagonal is neither top-left nor bottom-right runs the dense call."""
    m_len, n_len = q.shape[2], k.shape[2]
    offset = _offset(mods, m_len, n_len)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, run in enumerate(zip(plan.lo, plan.hi)):
        groups.setdefault(run, []).append(row)
    for (lo, hi), members in groups.items():
        qa = 0 if offset is None else min(max(lo - offset, 0), m_len)
        if hi == lo or qa == m_len:
            continue  # no query row sees a kept key: the empty-row rule fills them
        sliced = _sliced_causal(None if offset is None else qa + offset - lo, m_len - qa, hi - lo)
        rows = torch.tensor(members, device=q.device)
        whole = len(members) == q.shape[0]
        pick = _row_picker(members, rows, whole)
        if sliced is None:
            qa, target = 0, _dense(pick(q), pick(k), pick(v), pick(keep), _slice_bias(bias, rows, 0, 0, n_len),
                                   slopes, mods)
        else:
            target = _attend(pick(q)[:, :, qa:], pick(k)[:, :, lo:hi], pick(v)[:, :, lo:hi],
                             _slice_bias(bias, rows, qa, lo, hi), slopes, mods, sliced)
        if whole:
            out[:, :, qa:] = target
        elif _consecutive(members):
            out[members[0]:members[-1] + 1, :, qa:] = target
        else:
            out[rows, :, qa:] = target


def _consecutive(members: list[int]) -> bool:
    return members[-1] - members[0] == len(members) - 1


def _row_picker(members: list[int], rows: Tensor, whole: bool):
    """Batch rows of a group: the tensor itself, a view for consecutive rows (no copy: a gather of
    strided q/k/v costs as much as the attention it saves), else a gather."""
    if whole:
        return lambda x: x
    if _consecutive(members):
        return lambda x: x[members[0]:members[-1] + 1]
    return lambda x: x.index_select(0, rows)


def _dense(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, bias: Tensor | None, slopes: Tensor | None,
           mods: Mods) -> Tensor:
    """The masked call: the keep mask (and bias) as one mask tensor beside the structural flags."""
    keep4 = keep.view(keep.shape[0], 1, 1, keep.shape[1])
    mask = keep4 if bias is None else bias_4d(bias).masked_fill(~keep4, -math.inf)
    if _sdpa_takes(mods, slopes, "none", q.shape[2], k.shape[2], None):
        if mods.causal != "none":
            offset = _offset(mods, q.shape[2], k.shape[2])
            band = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(offset)
            mask = keep4 & band if bias is None else mask.masked_fill(~band, -math.inf)
        mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=mods.scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    out, _ = torch.ops.attnfx.attention(q, k, v, mask, slopes, mods.scale, mods.causal, mods.window,
                                        mods.softcap)
    return out


def _visible_rows(lo: int, hi: int, q_len: int, offset: int | None, window: int) -> tuple[int, int]:
    """Query rows [first, stop) that see a key of the kept run [lo, hi) under the band."""
    if hi <= lo:
        return 0, 0
    if offset is None:
        return 0, q_len
    stop = q_len if window == -1 else hi - 1 - offset + window
    return min(max(lo - offset, 0), q_len), min(max(stop, 0), q_len)


def empty_rows(keep: Tensor, plan: KeyPlan, q_len: int, mods: Mods) -> dict[int, Tensor]:
    """Batch row -> indices of its query rows that keep no key: from the kept runs in O(B) where
    the plan has them, else from prefix counts of the key mask in O(B*(N+M))."""
    n_len = keep.shape[1]
    offset = _offset(mods, q_len, n_len)
    if plan.path != "dense":
        runs = plan.runs(keep.shape[0], n_len)
        found = {}
        for b, (lo, hi) in enumerate(runs):
            first, stop = _visible_rows(lo, hi, q_len, offset, mods.window)
            if first > 0 or stop < q_len:
                rows = torch.arange(q_len, device=keep.device)
                found[b] = rows[(rows < first) | (rows >= stop)]
        return found
    counts = torch.nn.functional.pad(keep.to(torch.int32).cumsum(1), (1, 0))  # kept keys before x
    m = torch.arange(q_len, device=keep.device)
    hi = torch.full_like(m, n_len) if offset is None else (m + offset + 1).clamp(0, n_len)
    lo = torch.zeros_like(m) if mods.window == -1 else (m + offset - mods.window + 1).clamp(0, n_len)
    empty = (counts[:, hi] - counts[:, torch.minimum(lo, hi)]) == 0
    return {b: empty[b].nonzero().flatten() for b in empty.any(1).nonzero().flatten().tolist()}


def _fill_empty(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, slopes: Tensor | None, mods: Mods,
                empty: dict[int, Tensor], out: Tensor) -> None:
    """Rows that keep no key: 0 for a -inf fill, else softmax over all keys of (score + fill)."""
    acc = accumulation_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    for b, rows in empty.items():
        if math.isinf(mods.fill):
            out[b][:, rows] = 0.0
            continue
        qb = q[b][:, rows].to(acc)  # (H, r, E)
        kb = k[b].to(acc).repeat_interleave(groups, 0)
        s = (qb @ kb.transpose(-1, -2)) * mods.scale  # (H, r, N)
        if mods.softcap:
            s = torch.tanh(s / mods.softcap) * mods.softcap
        if bias is not None:
            bb = bias_4d(bias)
            bb = bb[b if bb.shape[0] > 1 else 0]
            s = s + (bb[:, rows] if bb.shape[1] > 1 else bb).to(acc)
        if slopes is not None:
            s = s + slopes.to(acc).view(-1, 1, 1) * (torch.arange(k.shape[2]) - rows.view(-1, 1)).to(acc)
        s = (s.to(q.dtype) + mods.fill).to(acc)  # the model adds its fill in its own dtype
        p = torch.softmax(s, -1)
        out[b][:, rows] = (p @ v[b].to(acc).repeat_interleave(groups, 0)).to(out.dtype)


def padded_forward(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, bias: Tensor | None,
                   alibi_slopes: Tensor | None, scale: float, causal: str, window: int, softcap: float,
                   fill: float) -> Tensor:
    """attnfx::padded_attention: dispatch on `key_keep`, then give rows that keep no key the fill's value."""
    d = _check(q, k, v, key_keep, bias, alibi_slopes, causal, window, softcap)
    keep = key_keep.reshape(-1, d.kv_len).expand(d.batch, d.kv_len)
    mods = Mods(scale, causal, window, softcap, fill)
    plan = plan_keys(keep)
    if plan.path == "all_kept":
        out = _in_output_layout(_attend(q, k, v, bias, alibi_slopes, mods, causal))
    elif plan.path == "padding_free":
        out = _new_output(q, d)  # every row is written below or is an empty row, filled after
        _padding_free(q, k, v, keep, bias, alibi_slopes, mods, plan, out)
    else:
        out = _in_output_layout(_dense(q, k, v, keep, bias, alibi_slopes, mods))
    empty = empty_rows(keep, plan, d.q_len, mods)
    if empty:
        out = out.clone()  # never write into a tensor autograd saved (SDPA's output)
        _fill_empty(q, k, v, bias, alibi_slopes, mods, empty, out)
    return out


def _new_output(q: Tensor, d: Dims) -> Tensor:
    """An uninitialised (B, H, M, F) output stored as (B, M, H, F): the layout SDPA's CPU kernel
    writes for a model's transposed q, so each group's result is copied in as one block and the
    model's `transpose(1, 2).reshape(B, M, H * F)` after the op is a view, not a copy."""
    return q.new_empty(d.batch, d.q_len, d.heads, d.value_dim).transpose(1, 2)


def _in_output_layout(out: Tensor) -> Tensor:
    """`out` stored as `_new_output` stores it (no copy when it already is)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _check(q, k, v, key_keep, bias, alibi_slopes, causal, window, softcap) -> Dims:
    d = check_args(q, k, v, decode_op_args(PADDED_OP, bias, alibi_slopes, 1.0, causal, window, softcap)[0],
                   PADDED_OP)
    if bias is not None and bias.dtype == torch.bool:
        raise ValueError("attnfx::padded_attention: bias must be additive; key masking goes in key_keep")
    shapes = [(b, d.kv_len) for b in (d.batch, 1)] + [(b, 1, 1, d.kv_len) for b in (d.batch, 1)]
    if key_keep.dtype != torch.bool or tuple(key_keep.shape) not in shapes:
        raise ValueError(f"attnfx::padded_attention: key_keep must be bool of shape (B|1, N) or (B|1, 1, 1, N) "
                         f"with B={d.batch}, N={d.kv_len}; got {key_keep.dtype} {tuple(key_keep.shape)}")
    return d


@torch.library.custom_op(
    "attnfx::padded_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor key_keep, Tensor? bias, Tensor? alibi_slopes, float scale, "
    "str causal, int window, float softcap, float fill) -> Tensor",
)
def padded_attention(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor, bias: Tensor | None,
                     alibi_slopes: Tensor | None, scale: float, causal: str, window: int, softcap: float,
                     fill: float) -> Tensor:
    """Attention over the keys `key_keep` keeps, skipping padded keys where the data allows."""
    return padded_forward(q, k, v, key_keep, bias, alibi_slopes, scale, causal, window, softcap, fill)


@padded_attention.register_fake
def _padded_fake(q, k, v, key_keep, bias, alibi_slopes, scale, causal, window, softcap, fill):
    return _new_output(q, _check(q, k, v, key_keep, bias, alibi_slopes, causal, window, softcap))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_keep, bias, alibi_slopes, *params = inputs
    ctx.save_for_backward(q, k, v, key_keep, bias, alibi_slopes)
    ctx.params = tuple(params)


def _backward(ctx, grad_out: Tensor):
    """Recompute the same dispatch under autograd and differentiate it."""
    q, k, v, key_keep, bias, alibi_slopes = ctx.saved_tensors
    wants_bias = bias is not None and ctx.needs_input_grad[4]
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    bias_leaf = bias.detach().requires_grad_() if wants_bias else bias
    with torch.enable_grad():
        out = padded_forward(*leaves, key_keep, bias_leaf, alibi_slopes, *ctx.params)
        inputs = leaves + ([bias_leaf] if wants_bias else [])
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return grads[0], grads[1], grads[2], None, grads[3] if wants_bias else None, None, None, None, None, None, None


padded_attention.register_autograd(_backward, setup_context=_setup_context)


def padded_call(spec: AttentionSpec, operands: Operands, key_keep, fill: float = -math.inf, bias=None) -> Call:
    """`attnfx::padded_attention(...)` for `spec` (its causal/window/softcap/ALiBi) over `key_keep`."""
    encoded = dict(zip((a.name for a in SCORE_ARGS), spec.mods.op_args()))
    args = (operands.q, operands.k, operands.v, key_keep, bias, operands.slopes if spec.alibi else None,
            *(encoded[name] for name in SCORE_ARGS_TAKEN), float(fill))
    return Call(torch.ops.attnfx.padded_attention.default, args, {})


def is_key_mask(spec: AttentionSpec) -> bool:
    """A bool mask tensor that depends on (batch, key) only: (B|1, 1, 1, N)."""
    shape = spec.mask_shape
    return spec.mask is MaskInput.BOOL and shape is not None and shape[1] == shape[2] == 1 and \
        shape[3] == spec.kv_len


def read_padded_call(node: Node) -> CallSite | None:
    """The call site of an `attnfx::padded_attention` call, its key_keep as the bool mask; ValueError
    for what one mask cannot state (a bias besides key_keep, a finite fill)."""
    if not calls_op(node, PADDED_OP):
        return None
    a = call_arguments(node)
    if a["bias"] is not None:
        raise ValueError(f"{PADDED_OP} with a bias besides key_keep has no single mask to export")
    if not math.isinf(a["fill"]):
        raise ValueError(f"{PADDED_OP} with fill={a['fill']} gives rows that keep no key a value a bool mask "
                         "cannot state")
    operands = Operands(a["q"], a["k"], a["v"], a["key_keep"], a["alibi_slopes"])
    return CallSite(operands, ScoreMods.from_op_args(a["scale"], a["causal"], a["window"], a["softcap"]))


class PaddedVariant:
    name = "padded"
    op = PADDED_OP
    read = staticmethod(read_padded_call)
    algorithm = "padded"
    takes = TAKES
    exact = True
    description = ("attnfx::padded_attention: run-time dispatch on the key mask (no mask / padding-free / "
                   "dense)")

    def refusal(self, spec: AttentionSpec, device: str) -> str | None:
        kind = kind_refusal(self.name, Kind.SOFTMAX, spec)
        if kind is not None:
            return kind
        if spec.dropout_p:
            return "attnfx::padded_attention has no dropout (sdpa fuses training dropout)"
        if not is_key_mask(spec):
            return "padded_attention takes a per-key bool mask (B, 1, 1, N); this site's mask is not one"
        return untaken_modifier(self.op, spec, self.takes)

    def call(self, spec: AttentionSpec, operands: Operands) -> Call:
        return padded_call(spec, operands, operands.mask, operands.fill)
