"""The ALiBi proof on its own: a bias term's symbolic value is (or is not) slopes[h] * (n - m) up to
a constant per row, and the tensor holding the slopes is found in the graph."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnfx.passes.attention import lift
from attnfx.passes.mask_eval import MaskEvaluator
from attnfx.passes.site import Alibi, Refusal
from graphs import only, rand, traced

B, H, M, E = 2, 4, 6, 8


def _positions(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """n - m over (M, N)."""
    return torch.arange(k.shape[-2]).view(1, -1) - torch.arange(q.shape[-2]).view(-1, 1)


def _attend(q, k, v, bias, weights=F.softmax):
    s = q @ k.transpose(-1, -2) / 8 ** 0.5 + bias
    return (weights(s, -1) if weights is F.softmax else torch.sigmoid(s)) @ v


def lifted(fn, kind: str = "softmax", n: int = M):
    q, k, v = rand(B, H, M, E), rand(B, H, n, E), rand(B, H, n, E)
    slopes = rand(H).abs() + 0.1
    gm = traced(fn, q, k, v, slopes)
    return lift(only(gm, kind), MaskEvaluator(gm)), gm


def test_exact_alibi_reads_its_slopes_from_the_input() -> None:
    site, gm = lifted(lambda q, k, v, s: _attend(q, k, v, s.view(-1, 1, 1) * _positions(q, k)))
    assert isinstance(site.alibi, Alibi), site.alibi
    assert site.alibi.exact and site.alibi.head_dim == 0
    # the slopes argument itself, through the model's own view of it (H, 1, 1): read at run time
    assert [n.op for n in site.alibi.source.all_input_nodes] == ["placeholder"]
    names = [lowering.name for lowering in site.lowerings]
    assert names == ["alibi+none", "tensor"]
    assert site.lowerings[0].spec.alibi and site.lowerings[0].spec.mask.value == "none"
    assert not site.lowerings[-1].spec.alibi  # the site as written keeps its dense bias


def test_mpt_form_is_alibi_up_to_a_per_row_constant() -> None:
    # MPT: slopes[h] * arange(1 - N, 1) over keys, the same for every query
    def mpt(q, k, v, s):
        n = k.shape[-2]
        return _attend(q, k, v, s.view(1, -1, 1, 1) * torch.arange(1 - n, 1).view(1, 1, 1, n))

    site, _ = lifted(mpt)
    assert isinstance(site.alibi, Alibi) and not site.alibi.exact
    assert "up to a constant per row" in site.alibi.text


def test_scaled_bias_keeps_its_coefficient() -> None:
    site, _ = lifted(lambda q, k, v, s: F.softmax((q @ k.transpose(-1, -2) + s.view(-1, 1, 1) * _positions(q, k))
                                                  * 0.25, -1) @ v)
    assert isinstance(site.alibi, Alibi) and site.alibi.term.coeff == 0.25


def test_bias_times_the_query_index_is_not_alibi() -> None:
    site, _ = lifted(lambda q, k, v, s: _attend(
        q, k, v, s.view(-1, 1, 1) * torch.arange(k.shape[-2]).view(1, -1) * torch.arange(q.shape[-2]).view(-1, 1)))
    assert isinstance(site.alibi, Refusal) and site.alibi.code.value == "ALIBI_SLOPE_AXIS"
    assert "varies along the query axis" in site.alibi.message
    assert [lowering.name for lowering in site.lowerings] == ["tensor"]


def test_symmetric_distance_is_not_linear() -> None:
    site, _ = lifted(lambda q, k, v, s: _attend(q, k, v, -s.view(-1, 1, 1) * _positions(q, k).abs()))
    assert isinstance(site.alibi, Refusal) and site.alibi.code.value == "ALIBI_NOT_LINEAR"


def test_slopes_over_the_batch_axis_are_refused() -> None:
    site, _ = lifted(lambda q, k, v, s: _attend(q, k, v, s[:B].view(-1, 1, 1, 1) * _positions(q, k)))
    assert isinstance(site.alibi, Refusal) and site.alibi.code.value == "ALIBI_SLOPE_AXIS"
    assert "b0" in site.alibi.message


def test_slopes_over_the_key_axis_read_data_at_the_keys() -> None:
    site, _ = lifted(lambda q, k, v, s: _attend(q, k, v, s.view(1, -1) * _positions(q, k)), n=H)
    assert isinstance(site.alibi, Refusal) and site.alibi.code.value == "ALIBI_READS_DATA"
    assert "at the key index (data, or an op the proof does not evaluate)" in site.alibi.message


def test_sigmoid_takes_exact_alibi_only() -> None:
    exact, _ = lifted(lambda q, k, v, s: _attend(q, k, v, s.view(-1, 1, 1) * _positions(q, k), None), "sigmoid")
    assert isinstance(exact.alibi, Alibi) and exact.alibi.exact

    def shifted(q, k, v, s):
        n = k.shape[-2]
        return _attend(q, k, v, s.view(1, -1, 1, 1) * torch.arange(1 - n, 1).view(1, 1, 1, n), None)

    site, _ = lifted(shifted, "sigmoid")
    assert isinstance(site.alibi, Refusal) and site.alibi.code.value == "ALIBI_SHIFT_KEPT"
    assert [lowering.name for lowering in site.lowerings] == ["tensor"]
