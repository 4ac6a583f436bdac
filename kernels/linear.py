"""attnfx::linear_attention in plain torch: linear attention contracted in the cheap order.

q and k arrive feature-mapped; per head (AttentionSpec's kind LINEAR)

    num[m] = scale * sum_n <q[m], k[n]> keep(m, n) decay^(m + offset - n) v[n]
    out[m] = num[m] / (sum_n of the same weights + norm_eps)          if normalize

The normaliser is the numerator of a value column of ones, so every algorithm computes it by
appending that column to V. Two algorithms, chosen by the caller:
  * right_to_left (no causal band, no decay): KV = K^T V per K/V head, then Q KV: O(N E F);
  * chunked (a causal band, any decay; Lightning): query rows in chunks of C, each an intra-chunk
    masked product plus a read of the running state KV <- decay^C KV + K_c^T (decay-weighted) V_c:
    O(N E F + N C E) time, O(N) memory.
The backward is the same contractions transposed; the reverse-time ones run the chunked core on
flipped sequences. GQA reads the shared K/V head in place; decay gets no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnfx.cost_model.spec import Causal

from .attention_args import Dims, ScoreTensors, accumulation_dtype, check_args

LINEAR_ATTENTION = "attnfx::linear_attention"
ALGORITHMS = ("right_to_left", "chunked")


@dataclass(frozen=True)
class LinearArgs:
    """The scalar arguments of attnfx::linear_attention, decoded and checked."""

    scale: float
    causal: Causal
    normalize: bool
    norm_eps: float
    algorithm: str
    chunk: int

    @classmethod
    def from_op_args(cls, scale: float, causal: str, normalize: bool, norm_eps: float, algorithm: str,
                     chunk: int) -> "LinearArgs":
        """ValueError naming the op and the argument that is not well-formed."""
        def bad(message: str) -> ValueError:
            return ValueError(f"{LINEAR_ATTENTION}: {message}")

        if causal not in [c.value for c in Causal]:
            raise bad(f"causal must be one of {[c.value for c in Causal]}, got {causal!r}")
        if algorithm not in ALGORITHMS:
            raise bad(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
        if (algorithm == "chunked") == (causal == Causal.NONE.value):
            raise bad(f"algorithm {algorithm!r} is for {'causal' if algorithm == 'chunked' else 'non-causal'} "
                      f"attention, got causal={causal!r}")
        if chunk < 1:
            raise bad(f"chunk must be >= 1, got {chunk}")
        if not norm_eps >= 0:
            raise bad(f"norm_eps must be >= 0, got {norm_eps}")
        return cls(float(scale), Causal(causal), bool(normalize), float(norm_eps), algorithm, int(chunk))


def check_linear_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None,
                      args: LinearArgs) -> Dims:
    """Dims of a call whose tensors line up; ValueError naming the first that does not."""
    d = check_args(q, k, v, ScoreTensors(), LINEAR_ATTENTION)
    if decay is not None:
        if tuple(decay.shape) != (d.heads,) or not decay.dtype.is_floating_point:
            raise ValueError(f"{LINEAR_ATTENTION}: decay must be floating of shape ({d.heads},), "
                             f"got {decay.dtype} {tuple(decay.shape)}")
        if args.algorithm == "right_to_left":
            raise ValueError(f"{LINEAR_ATTENTION}: a decay needs a causal band (algorithm 'chunked')")
    return d


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None,
                   args: LinearArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,M,F) in q's dtype, den (B,H,M) in the accumulation dtype: the row normaliser out
    was divided by, 1 where `normalize` is off)."""
    d = check_linear_args(q, k, v, decay, args)
    if decay is not None and not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"{LINEAR_ATTENTION}: decay must lie in (0, 1], got {decay.tolist()}")
    acc = accumulation_dtype(q.dtype)
    values = _values(v.to(acc), args.normalize)  # (b, hk, n, f | f + 1)
    num = _numerator(q.to(acc), k.to(acc), values, decay, d, args) * args.scale  # (b, h, m, f | f + 1)
    if not args.normalize:
        return num.to(q.dtype), torch.ones(num.shape[:3], dtype=acc, device=q.device)
    den = num[..., -1] + args.norm_eps
    return (num[..., :-1] / den[..., None]).to(q.dtype), den


def linear_backward(grad_out: torch.Tensor, grad_den: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, decay: torch.Tensor | None, out: torch.Tensor, den: torch.Tensor,
                    args: LinearArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of linear_forward."""
    d = check_linear_args(q, k, v, decay, args)
    acc = accumulation_dtype(q.dtype)
    g = grad_out.to(acc)
    if args.normalize:
        d_den = -(g * out.to(acc)).sum(-1) / den  # (b, h, m)
        if grad_den is not None:
            d_den = d_den + grad_den.to(acc)
        g = torch.cat([g / den[..., None], d_den[..., None]], dim=-1)  # d num: (b, h, m, f + 1)
    g = g * args.scale
    qa, ka, values = q.to(acc), k.to(acc), _values(v.to(acc), args.normalize)
    if args.algorithm == "right_to_left":
        dq, dk, dvalues = _right_to_left_backward(qa, ka, values, g, d)
    else:
        dq, dk, dvalues = _chunked_backward(qa, ka, values, g, decay, d, args)
    return dq.to(q.dtype), dk.to(k.dtype), dvalues[..., :d.value_dim].to(v.dtype).contiguous()


def _values(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """V, with a column of ones appended when the row sums of the weights are wanted."""
    return torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1) if normalize else v


def _numerator(q, k, values, decay, d: Dims, args: LinearArgs) -> torch.Tensor:
    """sum_n <q[m], k[n]> keep decay^(..) values[n], without the scale: (B, H, M, Fv)."""
    if args.algorithm == "right_to_left":
        state = k.transpose(-1, -2) @ values  # (b, hk, e, fv)
        return (_grouped(q, d) @ state).reshape(d.batch, d.heads, d.q_len, -1)
    num = lightning(_grouped(q, d, 5), k.unsqueeze(2), values.unsqueeze(2), _decay(decay, d),
                    d.causal_offset(args.causal), args.chunk)  # (b, hk, g, m, fv)
    return num.reshape(d.batch, d.heads, d.q_len, -1)


def _right_to_left_backward(q, k, values, g, d: Dims):
    gr = _grouped(g, d)  # (b, hk, g*m, fv)
    state = k.transpose(-1, -2) @ values  # (b, hk, e, fv)
    dq = (gr @ state.transpose(-1, -2)).reshape(q.shape)
    d_state = _grouped(q, d).transpose(-1, -2) @ gr  # (b, hk, e, fv)
    return dq, values @ d_state.transpose(-1, -2), k @ d_state


def _chunked_backward(q, k, values, g, decay, d: Dims, args: LinearArgs):
    """dq runs forward in time; dk and dvalues backward (flipped): key n gets from queries m >= n - offset."""
    lam, offset = _decay(decay, d), d.causal_offset(args.causal)
    q5, g5 = _grouped(q, d, 5), _grouped(g, d, 5)  # (b, hk, g, m, e | fv)
    k5, values5 = k.unsqueeze(2), values.unsqueeze(2)  # (b, hk, 1, n, e | fv)
    dq = lightning(g5, values5, k5, lam, offset, args.chunk).reshape(q.shape)

    def flip(x: torch.Tensor) -> torch.Tensor:
        return x.flip(-2)

    reverse_offset = d.q_len - d.kv_len + offset
    dk = flip(lightning(flip(values5), flip(g5), flip(q5), lam, reverse_offset, args.chunk)).sum(2)
    dvalues = flip(lightning(flip(k5), flip(q5), flip(g5), lam, reverse_offset, args.chunk)).sum(2)
    return dq, dk, dvalues


def _grouped(x: torch.Tensor, d: Dims, rank: int = 4) -> torch.Tensor:
    """Query-side x (B,H,M,D) with each K/V head's G query heads together: (B,Hkv,G*M,D), or
    (B,Hkv,G,M,D) for rank 5 (a view)."""
    if rank == 5:
        return x.reshape(d.batch, d.kv_heads, d.groups, x.shape[2], x.shape[3])
    return x.reshape(d.batch, d.kv_heads, d.groups * x.shape[2], x.shape[3])


def _decay(decay: torch.Tensor | None, d: Dims) -> torch.Tensor | None:
    return None if decay is None else decay.view(d.kv_heads, d.groups)


def lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None, offset: int,
              chunk: int) -> torch.Tensor:
    """out[m] = sum over n <= m + offset of <q[m], k[n]> decay^(m + offset - n) v[n], chunk by chunk.

    q (B, X, Gq, M, E), k (B, X, Gk, N, E), v (B, X, Gk, N, F), decay (X, G) or None, with the
    group dims broadcasting (Gq, Gk in {1, G}); out (B, X, G, M, F). The state at position p holds
    sum over n < p of decay^(p - n) k[n]^T v[n]; a chunk of rows at positions [p, p + C) reads it
    (times decay^(row - p)) and adds the keys [p, p + C) it does not hold through a masked product.
    """
    m_len, n_len = q.shape[3], k.shape[3]
    groups = max(q.shape[2], k.shape[2], 1 if decay is None else decay.shape[1])
    log_decay = None if decay is None else decay.to(q.dtype).log().view(1, decay.shape[0], decay.shape[1], 1, 1)
    out = q.new_empty(q.shape[0], q.shape[1], groups, m_len, v.shape[-1])
    state, pos = None, 0
    for m0 in range(0, m_len, chunk):
        m1 = min(m0 + chunk, m_len)
        start = m0 + offset  # position of the chunk's first row
        state, pos = _advance(state, pos, start, k, v, log_decay, chunk)
        rows = q[:, :, :, m0:m1]  # (b, x, gq, c, e)
        positions = torch.arange(start, start + m1 - m0, device=q.device).view(-1, 1)  # (c, 1)
        acc = torch.zeros(out.shape[:3] + (m1 - m0, v.shape[-1]), dtype=q.dtype, device=q.device)
        lo, hi = max(start, 0), min(start + m1 - m0, n_len)  # keys the state does not hold
        if hi > lo:
            keys = torch.arange(lo, hi, device=q.device).view(1, -1)  # (1, c')
            weights = _weights(positions - keys, log_decay, q.dtype)  # (c, c') or (1, x, g, c, c')
            acc += ((rows @ k[:, :, :, lo:hi].transpose(-1, -2)) * weights) @ v[:, :, :, lo:hi]
        if state is not None:
            acc += _decayed(rows, positions - pos, log_decay) @ state
        out[:, :, :, m0:m1] = acc
    return out


def _advance(state, pos: int, target: int, k, v, log_decay, chunk: int):
    """The state moved from position `pos` to `target`, taking in the keys between, C at a time."""
    n_len = k.shape[3]
    while pos < target:
        step = min(target, pos + chunk) if pos < n_len else target
        lo, hi = pos, min(step, n_len)
        if state is not None and log_decay is not None:
            state = state * (log_decay * (step - pos)).exp()
        if hi > lo:
            ages = step - torch.arange(lo, hi, device=k.device).view(-1, 1)  # (c', 1)
            weighted = _decayed(k[:, :, :, lo:hi], ages, log_decay)  # (b, x, g|gk, c', e)
            update = weighted.transpose(-1, -2) @ v[:, :, :, lo:hi]  # (b, x, g|gk, e, f)
            state = update if state is None else state + update
        pos = step
    return state, pos


def _decayed(x: torch.Tensor, ages: torch.Tensor, log_decay: torch.Tensor | None) -> torch.Tensor:
    """Rows of x (.., c, d) times decay^age (ages (c, 1) >= 0); x itself without a decay."""
    return x if log_decay is None else x * (log_decay * ages.to(x.dtype)).exp()


def _weights(ages: torch.Tensor, log_decay: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """decay^age where the key is visible (age >= 0), else 0."""
    visible = ages >= 0
    if log_decay is None:
        return visible.to(dtype)
    return (log_decay * ages.clamp_min(0).to(dtype)).exp() * visible
