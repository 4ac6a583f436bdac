"""How a block lays out q, k, v, computes the scores and contracts the probabilities with v.

Each layout starts from q (b, m, H, D), k and v (b, n, KV, D), sets `w.score_roles`, writes `s`,
and later turns `p` back into `o` (b, m, C). GQA is spelled by the block's `gqa` choice.
"""
from __future__ import annotations

from .grammar import C, D, H
from .writer import Writer


def write_scores(w: Writer) -> None:
    LAYOUTS[w.block.layout][0](w)


def write_av(w: Writer, p: str, transposed: bool = False) -> None:
    LAYOUTS[w.block.layout][1](w, p, transposed)


def _repeat_heads(w: Writer, roles: str) -> None:
    """Repeat k and v (dims `roles`) from KV to H heads along their head axis."""
    axis, kv, g = roles.index("h"), w.block.kv_heads, w.block.groups
    sizes = {"b": "b", "h": str(kv), "n": "n", "d": str(D)}
    for name in ("k", "v"):
        if w.block.gqa == "repeat_interleave":
            w.line(f"{name} = {name}.repeat_interleave({g}, dim={axis})")
            continue
        index = ", ".join([":"] * (axis + 1) + ["None"])
        grouped = ", ".join([sizes[r] for r in roles[:axis + 1]] + [str(g)] + [sizes[r] for r in roles[axis + 1:]])
        merged = ", ".join(str(H) if r == "h" else sizes[r] for r in roles)
        w.line(f"{name} = {name}[{index}].expand({grouped}).reshape({merged})")


def _heads_first(w: Writer) -> bool:
    """q, k, v to (b, h, ·, d); True when GQA stays a broadcast over a group dim (5-D)."""
    w.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, ·, d)")
    if w.block.gqa == "broadcast":
        w.line(f"q = q.reshape(b, {w.block.kv_heads}, {w.block.groups}, m, {D})  # (b, kv, g, m, d)")
        w.line("k, v = k[:, :, None], v[:, :, None]  # (b, kv, 1, n, d)")
        return True
    if w.block.gqa != "none":
        _repeat_heads(w, "bhnd")
    return False


def _heads_back(w: Writer, grouped: bool) -> None:
    if grouped:
        w.line("o = o.flatten(1, 2)")
    w.line(f"o = o.transpose(1, 2).reshape(b, m, {C})")


def _matmul_scores(w: Writer) -> None:
    grouped = _heads_first(w)
    w.score_roles = "bkgmn" if grouped else "bhmn"
    spelling = w.block.qk
    if spelling == "at":
        w.line("s = q @ k.transpose(-2, -1)")
    elif spelling == "matmul":
        w.line("s = torch.matmul(q, k.transpose(-1, -2))")
    elif spelling == "mT":
        w.line("s = q @ k.mT")
    else:
        w.line(f"kt = k.permute({'0, 1, 2, 4, 3' if grouped else '0, 1, 3, 2'})")
        w.line("s = torch.matmul(q, kt)")


def _matmul_av(w: Writer, p: str, transposed: bool) -> None:
    w.line(f"o = {p}.transpose(-2, -1) @ v" if transposed else f"o = torch.matmul({p}, v)")
    _heads_back(w, w.score_roles == "bkgmn")


def _merged_scores(w: Writer) -> None:
    w.line(f"q = q.transpose(1, 2).reshape(b * {H}, m, {D})")
    w.line("k, v = k.transpose(1, 2), v.transpose(1, 2)")
    if w.block.gqa != "none":
        _repeat_heads(w, "bhnd")
    w.line(f"k, v = k.reshape(b * {H}, n, {D}), v.reshape(b * {H}, n, {D})  # (b*h, n, d)")
    w.score_roles = "Bmn"
    if w.block.layout == "bmm":
        w.line("s = torch.bmm(q, k.transpose(1, 2))")
    else:
        w.line(f"s = torch.baddbmm(torch.zeros(b * {H}, m, n, dtype=q.dtype, device=q.device), q, "
               "k.transpose(1, 2), beta=0.0, alpha=1.0)")


def _merged_av(w: Writer, p: str, transposed: bool) -> None:
    w.line(f"o = torch.bmm({p}, v).view(b, {H}, m, {D}).transpose(1, 2).reshape(b, m, {C})")


def _einsum_roles(w: Writer) -> tuple[str, str, str]:
    """Write q, k, v in the einsum's operand layouts; returns (q roles, k/v roles, score roles)."""
    spec = w.block.einsum
    heads_first = spec.q_layout == "bhmd"
    if heads_first:
        w.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
    if w.block.gqa == "broadcast":
        kv, g = w.block.kv_heads, w.block.groups
        q_roles, kv_roles = ("bkgmd", "bknd") if heads_first else ("bmkgd", "bnkd")
        w.line(f"q = q.reshape({', '.join({'b': 'b', 'm': 'm', 'k': str(kv), 'g': str(g), 'd': str(D)}[r] for r in q_roles)})")
        return q_roles, kv_roles, "bkgmn" if spec.scores == "bhmn" else "bmkgn"
    kv_roles = "bhnd" if heads_first else "bnhd"
    if w.block.gqa != "none":
        _repeat_heads(w, kv_roles)
    return ("bhmd" if heads_first else "bmhd"), kv_roles, spec.scores


def _letters(w: Writer, roles: str) -> str:
    letters = dict(zip("bhmndg", w.block.einsum.letters))
    letters["k"] = letters["h"]
    return "".join(letters[r] for r in roles)


def _einsum_scores(w: Writer) -> None:
    q_roles, kv_roles, score_roles = _einsum_roles(w)
    w.score_roles = score_roles
    w.einsum_roles = (q_roles, kv_roles)
    w.line(f'# scores laid out ({", ".join(score_roles)})')
    w.line(f's = torch.einsum("{_letters(w, q_roles)},{_letters(w, kv_roles)}->{_letters(w, score_roles)}", q, k)')


def _einsum_av(w: Writer, p: str, transposed: bool) -> None:
    q_roles, kv_roles = w.einsum_roles
    equation = f"{_letters(w, w.score_roles)},{_letters(w, kv_roles)}->{_letters(w, q_roles)}"
    w.line(f'o = torch.einsum("{equation}", {p}, v)')
    if q_roles.startswith("bm"):
        w.line(f"o = o.reshape(b, m, {C})")
    else:
        _heads_back(w, "g" in q_roles)


def _ellipsis_scores(w: Writer) -> None:
    grouped = _heads_first(w)
    w.score_roles = "bkgmn" if grouped else "bhmn"
    w.line('s = torch.einsum("...md,...nd->...mn", q, k)')


def _ellipsis_av(w: Writer, p: str, transposed: bool) -> None:
    w.line(f'o = torch.einsum("...mn,...nd->...md", {p}, v)')
    _heads_back(w, w.score_roles == "bkgmn")


LAYOUTS = {
    "matmul": (_matmul_scores, _matmul_av),
    "bmm": (_merged_scores, _merged_av),
    "baddbmm": (_merged_scores, _merged_av),
    "einsum": (_einsum_scores, _einsum_av),
    "ellipsis": (_ellipsis_scores, _ellipsis_av),
}
