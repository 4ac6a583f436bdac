"""The source of every operation on the scores and of the normalisation that turns them into p."""
from __future__ import annotations

from typing import Callable

from .grammar import D, PAST, SQRT_D, TABLE, WINDOW, Scale, Term
from .writer import Writer

DEVICE = "device=x.device"
FILL_SOURCE = {"-inf": 'float("-inf")', "finfo_min": "torch.finfo(s.dtype).min", "-1e9": "-1e9", "-1e4": "-10000.0"}
ScoreOp = tuple[str, Callable[[Writer], None]]  # (label, writes the op)


def score_ops(w: Writer) -> list[ScoreOp]:
    """The block's ops on the scores in the order it applies them (a near-miss may insert more)."""
    block, scale = w.block, w.block.scale
    ops: list[ScoreOp] = []
    if scale.placement == "scores":
        ops.append(("scale", lambda w: write_scale(w, "s")))
    if block.softcap:
        ops.append(("softcap", write_softcap))
    if scale.placement == "after_softcap":
        ops.append(("scale", lambda w: write_scale(w, "s")))
    for term in block.terms:
        ops.append((term.family, lambda w, term=term: write_term(w, term)))
    if scale.placement == "after_mask":
        ops.append(("scale", lambda w: write_scale(w, "s")))
    return ops


def write_sink(w: Writer) -> None:
    """gpt-oss's sink: a learned logit per head (or per query) concatenated after the keys, right before
    the normalisation (after every score op, a near-miss's included)."""
    if w.block.sink == "per_head":
        w.init("self.sinks = nn.Parameter(torch.randn(H))")
        w.line(f"sink = {w.align('self.sinks', 'h')}  # one logit per head")
    else:
        w.init("self.sinks = nn.Parameter(torch.randn(TABLE))")
        w.line(f"sink = {w.align('self.sinks[:m]', 'm')}  # one logit per query")
    assert w.dim("n") == -1, "the sink joins the keys as the scores' last column"
    w.line("s = torch.cat([s, sink.expand(*s.shape[:-1], 1)], dim=-1)  # (..., n + 1)")


def write_scale(w: Writer, target: str) -> None:
    """`target = target * scale` (or `/ (1 / scale)`) in the form the block holds the factor."""
    scale: Scale = w.block.scale
    divides = scale.op == "div"
    factor = 1.0 / scale.value if divides else scale.value
    if scale.form == "literal":
        expr = (f"math.sqrt({D})" if divides else f"{D} ** -0.5") if scale.value == SQRT_D else repr(factor)
    elif scale.form == "shape":
        expr = "math.sqrt(q.size(-1))" if divides else "q.shape[-1] ** -0.5"
    elif scale.form == "const0d":
        expr = f"torch.tensor({factor!r}, dtype=x.dtype, {DEVICE})"
    elif scale.form == "per_head":  # Swin V2's learned temperature: one per head, kept positive by exp
        w.init(f"self.logit_scale = nn.Parameter(torch.full((H, 1, 1), {abs(factor)!r}).log() + 0.2 * torch.randn(H, 1, 1))")
        expr = w.align("self.logit_scale.exp()", "hmn")
    else:
        expr = "self.scale"
        w.init({"buffer": f'self.register_buffer("scale", torch.tensor({factor!r}))',
                "parameter": f"self.scale = nn.Parameter(torch.tensor({factor!r}))",
                "attribute": f"self.scale = {factor!r}"}[scale.form])
    w.line(f"{target} = {target} {'/' if divides else '*'} {expr}")


def write_softcap(w: Writer) -> None:
    cap = w.block.softcap
    w.line({"tanh_div": f"s = torch.tanh(s / {cap!r}) * {cap!r}",
            "method": f"s = s.div({cap!r}).tanh().mul({cap!r})",
            "cap_first": f"s = {cap!r} * torch.tanh(s / {cap!r})",
            "mul_inverse": f"s = torch.tanh(s * {1.0 / cap!r}) * {cap!r}"}[w.block.softcap_spelling])


def relative_positions(w: Writer) -> str:
    name = w.fresh("rel")
    w.line(f"{name} = torch.arange(n, {DEVICE})[None, :] - torch.arange(m, {DEVICE})[:, None]  # (m, n) key - query")
    return name


def _exclusion(w: Writer, term: Term) -> tuple[str, str, str]:
    """(expression, roles, polarity) of an exclusion mask; polarity keep / excl / additive."""
    ones = f"torch.ones(m, n, dtype=torch.bool, {DEVICE})"
    fill = FILL_SOURCE.get(term.fill, "")
    family, spelling = term.family, term.spelling
    if family == "causal":
        if spelling == "buffer":
            w.init(f'self.register_buffer("causal", torch.ones(TABLE, TABLE, dtype=torch.bool).tril(), persistent=False)')
        if spelling == "buffer_4d":
            w.init('self.register_buffer("bias", torch.tril(torch.ones(TABLE, TABLE)).view(1, 1, TABLE, TABLE))')
        return {"tril": (f"{ones}.tril()", "mn", "keep"), "triu": (f"{ones}.triu(1)", "mn", "excl"),
                "arange": (f"torch.arange(m, {DEVICE})[:, None] >= torch.arange(n, {DEVICE})[None, :]", "mn", "keep"),
                "buffer": ("self.causal[:m, :n]", "mn", "keep"),
                "buffer_4d": ("self.bias[:, :, :m, :n] == 0", "__mn", "excl"),
                "full_triu": (f"torch.full((m, n), {fill}, dtype=s.dtype, {DEVICE}).triu(1)", "mn", "additive"),
                }[spelling]
    if family == "causal_br":
        if spelling == "cache_position":
            w.line(f"position = torch.arange(PAST, PAST + m, {DEVICE})  # absolute positions of the queries")
        return {"triu_symbolic": (f"{ones}.triu(n - m + 1)", "mn", "excl"),
                "tril_symbolic": (f"{ones}.tril(n - m)", "mn", "keep"),
                "arange_symbolic": (f"torch.arange(n, {DEVICE})[None, :] <= torch.arange(m, {DEVICE})[:, None] + (n - m)",
                                    "mn", "keep"),
                "triu_literal": (f"{ones}.triu({PAST + 1})", "mn", "excl"),
                "cache_position": (f"torch.arange(n, {DEVICE})[None, :] <= position[:, None]", "mn", "keep"),
                }[spelling]
    if family == "window":
        if spelling == "tril_triu":
            return f"{ones}.tril(n - m).triu(n - m - {WINDOW - 1})", "mn", "keep"
        distance = w.fresh("distance")
        w.line(f"{distance} = torch.arange(m, {DEVICE})[:, None] + (n - m) - torch.arange(n, {DEVICE})[None, :]")
        if spelling == "arange":
            return f"({distance} >= 0) & ({distance} < W)", "mn", "keep"
        return f"({distance} < 0) | ({distance} >= W)", "mn", "excl"
    source = "memory" if w.block.projection == "cross" else "x"
    return {"eq0": ("key_mask == 0", "bn", "excl"), "bool": ("key_mask.bool()", "bn", "keep"),
            "from_data": (f"{source}[..., 0] > -1.5", "bn", "keep"),
            "hf_additive": (f"(1.0 - key_mask.to(s.dtype)) * {fill}", "bn", "additive"),
            "hf_4d": (f"(1.0 - key_mask[:, None, None, :].to(s.dtype)) * {fill}", "b__n", "additive"),
            }[spelling]


def _bias(w: Writer, term: Term) -> tuple[str, str]:
    """(expression, roles) of an additive bias."""
    if term.family == "alibi":
        w.init('self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]))')
        if term.spelling == "bloom":
            return f"self.slopes[:, None, None] * torch.arange(n, {DEVICE})[None, None, :]", "hmn"
        rel = relative_positions(w)
        sign, distance = ("-", f"{rel}.abs()") if term.spelling == "symmetric" else ("", rel)
        return f"{sign}self.slopes[:, None, None] * {distance}", "hmn"
    if term.family == "relpos":
        rel = relative_positions(w)
        if term.spelling == "table":
            w.init("self.rel_bias = nn.Parameter(torch.randn(H, 2 * TABLE - 1) * 0.5)")
            return f"self.rel_bias[:, {rel} + TABLE - 1]", "hmn"
        w.init("self.rel_emb = nn.Embedding(2 * TABLE - 1, H)")
        return f"self.rel_emb({rel} + TABLE - 1).permute(2, 0, 1)", "hmn"
    if term.spelling == "slice":
        w.init("self.pos_bias = nn.Parameter(torch.randn(H, TABLE, TABLE) * 0.5)")
        return "self.pos_bias[:, :m, :n]", "hmn"
    w.init("self.pos_bias = nn.Parameter(torch.randn(1, H, TABLE, TABLE) * 0.5)")
    return "self.pos_bias[:, :, :m, :n]", "_hmn"


def write_term(w: Writer, term: Term) -> None:
    if term.is_bias:
        expr, roles = _bias(w, term)
        name = w.fresh(term.family)
        w.line(f"{name} = {expr}  # ({', '.join(roles)})")
        aligned = w.align(name, roles)
        w.line({"add": f"s = s + {aligned}", "radd": f"s = {aligned} + s", "iadd": f"s += {aligned}"}[term.apply])
        return
    expr, roles, polarity = _exclusion(w, term)
    name = w.fresh(term.family)
    w.line(f"{name} = {expr}  # ({', '.join(roles)}) {polarity}")
    fill = FILL_SOURCE[term.fill]
    if polarity == "additive":
        w.line(f"s = s + {w.align(name, roles)}")
    elif term.apply == "additive":
        excluded = f"~{name}" if polarity == "keep" else name
        w.line(f"s = s + {w.align(f'torch.zeros_like({name}, dtype=s.dtype).masked_fill({excluded}, {fill})', roles)}")
    elif term.apply == "additive_scaled":
        additive = f"(1.0 - {name}.to(s.dtype)) * {fill}" if polarity == "keep" else f"{name}.to(s.dtype) * {fill}"
        w.line(f"s = s + {w.align(additive, roles)}")
    elif term.apply == "where":
        aligned = w.align(name, roles)
        w.line(f"s = torch.where({aligned}, s, {fill})" if polarity == "keep" else f"s = torch.where({aligned}, {fill}, s)")
    else:
        aligned = w.align(name, roles)
        w.line(f"s = s.masked_fill({aligned}.logical_not(), {fill})" if polarity == "keep"
               else f"s = s.masked_fill({aligned}, {fill})")


def write_softmax(w: Writer, key_role: str = "n", max_role: str = "n", log: bool = False) -> str:
    """Writes p, the normalised scores, as the block spells its softmax; returns p's name."""
    spelling, upcast = w.block.softmax, w.block.upcast
    kd, md = w.dim(key_role), w.dim(max_role)
    src = "s.float()" if upcast == "float" else "s"
    if spelling.startswith("hw_"):
        if upcast == "float":
            w.line("s = s.float()")
        _handwritten(w, spelling, kd, md)
    else:
        name = "log_softmax" if log else "softmax"
        extra = ", dtype=torch.float32" if upcast == "dtype_arg" else ""
        if spelling == "module":
            w.init(f"self.{name} = nn.{'LogSoftmax' if log else 'Softmax'}(dim={kd})")
        w.line("p = " + {"F.softmax": f"F.{name}({src}, dim={kd}{extra})",
                         "torch.softmax": f"torch.{name}({src}, {kd}{extra})",
                         "method": f"{src}.{name}(dim={kd}{extra})",
                         "module": f"self.{name}({src})",
                         "posdim": f"F.{name}({src}, dim={kd + len(w.score_roles)}{extra})"}[spelling])
    if upcast != "none":
        w.line("p = p.type_as(v)" if upcast == "float" else "p = p.to(v.dtype)")
    return "p"


def _handwritten(w: Writer, spelling: str, kd: int, md: int) -> None:
    total = f"e.sum(dim={kd}, keepdim=True)"
    if spelling == "hw_amax":
        w.line(f"e = torch.exp(s - s.amax(dim={md}, keepdim=True))")
    elif spelling == "hw_max_values":
        index = "[..., None]" if md == -1 else f".unsqueeze({md})"
        w.line(f"e = (s - s.max(dim={md}).values{index}).exp()")
    elif spelling == "hw_max_indexed":
        w.line(f"e = torch.exp(s - s.max(dim={md}, keepdim=True)[0])")
        total = f"torch.sum(e, dim={kd}, keepdim=True)"
    elif spelling == "hw_logsumexp":
        w.line(f"p = torch.exp(s - torch.logsumexp(s, dim={kd}, keepdim=True))")
        return
    elif spelling == "hw_nomax":
        w.line("e = s.exp()")
    else:
        w.line(f"e = torch.exp(s - s.amax(dim={md}, keepdim=True).detach())")
        w.line(f"p = e.div({total})")
        return
    w.line(f"p = e / {total}")
