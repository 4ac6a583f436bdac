"""attnfx::linear_attention: both contraction orders against the float64 oracle, forward and
gradients, the op's registrations, memory linear in the length, and training through it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnfx.kernels  # noqa: F401  (registers torch.ops.attnfx)
from kernel_cases import LargestOutput, LinearCase, assert_close, reference, reference_grads
from attnfx.cost_model.spec import AttentionSpec, Causal, Kind
from attnfx.kernels import Operands, get_variant

OP = torch.ops.attnfx.linear_attention.default
BACKWARD = torch.ops.attnfx.linear_attention_backward.default

CASES: dict[str, LinearCase] = {
    "non_causal": LinearCase(causal="none"),
    "non_causal_normalized_mqa": LinearCase(causal="none", kv_heads=1, normalize=True, norm_eps=1e-3),
    "top_left": LinearCase(),
    "top_left_decay": LinearCase(decay=True),
    "top_left_decay_normalized": LinearCase(decay=True, normalize=True, norm_eps=1e-6),
    "top_left_m_gt_n": LinearCase(q_len=100, kv_len=37, decay=True, normalize=True),
    "bottom_right": LinearCase(q_len=37, kv_len=100, causal="bottom_right"),
    "bottom_right_decay_normalized_gqa": LinearCase(heads=6, kv_heads=2, q_len=37, kv_len=100,
                                                    causal="bottom_right", decay=True, normalize=True),
    "bottom_right_m_gt_n": LinearCase(q_len=100, kv_len=37, causal="bottom_right", decay=True, normalize=True,
                                      norm_eps=0.5),
    "decode": LinearCase(q_len=1, kv_len=300, causal="bottom_right", decay=True, normalize=True),
    "mha": LinearCase(kv_heads=4, decay=True),
}


def run(case: LinearCase, t: dict[str, torch.Tensor], chunk: int = 16) -> torch.Tensor:
    return OP(*case.op_args(t, chunk))[0]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_oracle_for_any_chunk(name, chunk):
    case = CASES[name]
    t = case.tensors()
    assert_close(run(case, t, chunk), reference(case, t), "float32")


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_oracle(name):
    case = CASES[name]
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V")}
    out = run(case, {**t, **leaves})
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = reference_grads(case, t, grad_out)
    for n, leaf in leaves.items():
        assert_close(leaf.grad, expected[n], "float32", what=f"d{n}")


@pytest.mark.parametrize("length", [256, 1000, 2048])
@pytest.mark.parametrize("name", ["non_causal_normalized_mqa", "top_left_decay_normalized",
                                  "bottom_right_decay_normalized_gqa"])
def test_exact_to_1e4_relative_at_three_lengths(name, length):
    case = CASES[name].with_(q_len=length if CASES[name].q_len == CASES[name].kv_len else length // 2,
                             kv_len=length, head_dim=32, value_dim=32)
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V")}
    out = OP(*case.op_args({**t, **leaves}, 64))[0]
    expected = reference(case, t)
    assert relative_error(out, expected) < 1e-4
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected_grads = reference_grads(case, t, grad_out)
    for n, leaf in leaves.items():
        assert relative_error(leaf.grad, expected_grads[n]) < 1e-4, f"d{n}"


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("name", ["non_causal_normalized_mqa", "bottom_right_decay_normalized_gqa"])
def test_dtypes(name, dtype):
    case = CASES[name].with_(dtype=dtype)
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V")}
    out, den = OP(*case.op_args({**t, **leaves}))
    assert out.dtype == t["Q"].dtype and den.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert_close(out, reference(case, t), dtype)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    out.backward(grad_out)
    expected = reference_grads(case, t, grad_out.double())
    for n, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, expected[n], dtype, what=f"d{n}")


def test_gradcheck_in_float64():
    case = CASES["bottom_right_decay_normalized_gqa"].with_(q_len=5, kv_len=9, head_dim=3, value_dim=2,
                                                            dtype="float64", norm_eps=0.1)
    t = case.tensors()
    args = case.op_args(t, 2)

    def f(q, k, v):
        return OP(q, k, v, *args[3:])

    assert torch.autograd.gradcheck(f, [t[n].clone().requires_grad_() for n in "QKV"])


def test_den_is_the_row_normaliser_and_its_gradient_flows():
    case = CASES["top_left_decay_normalized"].with_(dtype="float64")
    t = case.tensors()
    q = t["Q"].clone().requires_grad_()
    _, den = OP(q, *case.op_args(t)[1:])
    # the normaliser is the numerator of a value column of ones (with the scale), plus norm_eps
    ones = {**t, "V": torch.ones_like(t["V"][..., :1])}
    assert_close(den, reference(case.with_(normalize=False, value_dim=1), ones)[..., 0] + case.norm_eps, "float64")
    den.sum().backward()
    q2 = t["Q"].clone().requires_grad_()
    reference(case.with_(normalize=False, value_dim=1), {**ones, "Q": q2}).sum().backward()
    assert_close(q.grad, q2.grad, "float64")


def test_memory_is_linear_in_the_length_at_4096():
    case = LinearCase(batch=1, heads=2, kv_heads=2, q_len=4096, kv_len=4096, head_dim=16, value_dim=16,
                      decay=True, normalize=True)
    t = case.tensors()
    leaves = {n: t[n].clone().requires_grad_() for n in ("Q", "K", "V")}
    with LargestOutput() as used:
        out = OP(*case.op_args({**t, **leaves}, 64))[0]
        out.sum().backward()
    # the largest tensors are (B, H, N, F + 1) copies of V and the numerator: never (N, N)
    assert used.largest <= 2 * 4096 * (16 + 1)
    assert 2 * 4096 * 4096 >= 100 * used.largest


def test_opcheck_forward_and_backward():
    for name in ("non_causal_normalized_mqa", "bottom_right_decay_normalized_gqa"):
        case = CASES[name].with_(q_len=5, kv_len=9)
        t = case.tensors()
        args = [x.clone().requires_grad_() if i < 3 else x for i, x in enumerate(case.op_args(t, 4))]
        torch.library.opcheck(OP, tuple(args))
        out, den = OP(*args)
        torch.library.opcheck(BACKWARD, (torch.randn_like(out), torch.randn_like(den), *[a.detach() for a in args[:3]],
                                         args[3], out.detach(), den.detach(), *args[4:]))


@pytest.mark.parametrize("change,message", [
    (dict(causal="diagonal"),
     "attnfx::linear_attention: causal must be one of ['none', 'top_left', 'bottom_right'], got 'diagonal'"),
    (dict(algorithm="fft"), "attnfx::linear_attention: algorithm must be one of ['right_to_left', 'chunked'], "
                            "got 'fft'"),
    (dict(algorithm="right_to_left"),
     "attnfx::linear_attention: algorithm 'right_to_left' is for non-causal attention, got causal='top_left'"),
    (dict(causal="none"),
     "attnfx::linear_attention: algorithm 'chunked' is for causal attention, got causal='none'"),
    (dict(chunk=0), "attnfx::linear_attention: chunk must be >= 1, got 0"),
    (dict(norm_eps=-1.0), "attnfx::linear_attention: norm_eps must be >= 0, got -1.0"),
    (dict(decay=torch.full((3,), 0.5)),
     "attnfx::linear_attention: decay must be floating of shape (4,), got torch.float32 (3,)"),
    (dict(decay=torch.tensor([0.5, 0.9, 1.0, 1.5])),
     "attnfx::linear_attention: decay must lie in (0, 1], got [0.5, 0.8999999761581421, 1.0, 1.5]"),
])
def test_malformed_calls_are_value_errors(change, message):
    case = LinearCase(q_len=4, kv_len=8, decay=True)
    names = ("q", "k", "v", "decay", "scale", "causal", "normalize", "norm_eps", "algorithm", "chunk")
    args = dict(zip(names, case.op_args(case.tensors())))
    with pytest.raises(ValueError) as err:
        OP(**{**args, **change})
    assert str(err.value) == message


def test_a_decay_without_a_causal_band_is_a_value_error():
    case = LinearCase(q_len=4, kv_len=8, causal="none", decay=True)
    with pytest.raises(ValueError, match="^attnfx::linear_attention: a decay needs a causal band"):
        OP(*case.op_args(case.tensors()))


class _Linear(nn.Module):
    def forward(self, q, k, v, decay):
        return OP(q, k, v, decay, 0.5, "bottom_right", True, 1e-6, "chunked", 16)[0]


def test_export_with_dynamic_lengths_round_trips(tmp_path):
    case = CASES["bottom_right_decay_normalized_gqa"].with_(norm_eps=1e-6)
    t = case.tensors()
    args = (t["Q"], t["K"], t["V"], t["DECAY"])
    m, n = torch.export.Dim("m", min=2, max=512), torch.export.Dim("n", min=2, max=512)
    ep = torch.export.export(_Linear(), args, dynamic_shapes=({2: m}, {2: n}, {2: n}, None))
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"].count(OP) == 1
    torch.export.save(ep, tmp_path / "linear.pt2")
    loaded = torch.export.load(tmp_path / "linear.pt2").module()
    bigger = case.with_(q_len=50, kv_len=120)
    t2 = bigger.tensors(seed=1)
    assert_close(loaded(t2["Q"], t2["K"], t2["V"], t2["DECAY"]), reference(bigger, t2), "float32")


DIM, HEADS, KV_HEADS, SEQ, VOCAB = 32, 4, 2, 40, 32


def written_linear_attention(q, k, v, decay):
    """How a model writes causal decayed linear attention: the O(N^2) weight matrix."""
    k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
    pos = torch.arange(q.shape[2])
    age = (pos.view(-1, 1) - pos.view(1, -1)).clamp_min(0)
    weights = (q @ k.transpose(-1, -2)) * torch.tril(decay.view(-1, 1, 1) ** age)
    return (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)


def lightning_attention(q, k, v, decay):
    """The call a rewrite to attnfx_lightning emits for the same site."""
    b, h, m, e = q.shape
    spec = AttentionSpec(b, h, k.shape[1], m, m, e, e, causal=Causal.TOP_LEFT, kind=Kind.LINEAR, decay=True,
                         normalize=True, norm_eps=1e-6)
    return get_variant("attnfx_lightning").call(spec, Operands(q=q, k=k, v=v, decay=decay)).run()


class TinyLinearLM(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.embed = nn.Embedding(VOCAB, DIM)
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * (DIM // HEADS))
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("decay", torch.linspace(0.8, 0.99, HEADS))

    def forward(self, tokens):
        b, t = tokens.shape
        x = self.embed(tokens)
        q = nn.functional.elu(self.q(x).view(b, t, HEADS, -1).transpose(1, 2)) + 1
        k, v = self.kv(x).view(b, t, 2, KV_HEADS, -1).permute(2, 0, 3, 1, 4)
        o = self.attend(q, nn.functional.elu(k) + 1, v, self.decay)
        return self.head(x + o.transpose(1, 2).reshape(b, t, DIM))


def test_a_model_trains_through_it_like_through_the_written_form():
    torch.manual_seed(0)
    written = TinyLinearLM(written_linear_attention)
    fused = copy.deepcopy(written)
    fused.attend = lightning_attention
    tokens = torch.randint(0, VOCAB, (3, SEQ + 1))
    losses = {}
    for name, model in (("written", written), ("fused", fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[name] = []
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["written"][-1] < losses["written"][0] - 0.1
    assert losses["fused"] == pytest.approx(losses["written"], rel=1e-5, abs=1e-5)
