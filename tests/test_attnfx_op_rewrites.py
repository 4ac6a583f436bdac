"""Sites SDPA cannot express go to attnfx's own ops (here attnfx::bounded_attention, whose backward is
attnfx::attention's); the rewritten model exports, reloads and trains."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import attnfx
import attention_cases as cases
from attention_cases import Projected, inputs


def softcapped_causal(q, k, v):
    """Gemma 2 style: tanh softcap on the scores, then a causal mask."""
    t = q.size(-2)
    s = torch.tanh((q @ k.transpose(-2, -1) * cases.SCALE) / 5.0) * 5.0
    s = s.masked_fill(~cases.causal_keep(t, q.device), float("-inf"))
    return F.softmax(s, dim=-1) @ v


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, cases.C)
        self.attn = Projected(softcapped_causal)
        self.head = nn.Linear(cases.C, 50)

    def forward(self, ids):
        return self.head(self.attn(self.embed(ids)))


def test_softcap_site_goes_to_the_attnfx_op() -> None:
    model = Projected(softcapped_causal).eval()
    opt = attnfx.optimize(model, inputs())
    (entry,) = opt.report.entries
    assert entry.status == "REWRITTEN" and entry.variant == "attnfx_bounded"
    assert entry.spec.softcap == 5.0 and entry.spec.causal.value == "top_left"
    assert ("sdpa", "flag", "SDPA has no softcap") in entry.unavailable
    targets = [n.target for n in opt.graph_module.graph.nodes]
    assert torch.ops.attnfx.bounded_attention.default in targets
    for t, b in ((12, 2), (37, 1)):
        x = inputs(t, b)
        with torch.no_grad():
            torch.testing.assert_close(opt(*x), model(*x), atol=1e-5, rtol=1e-5)


def test_rewritten_model_exports_and_round_trips(tmp_path) -> None:
    model = Projected(softcapped_causal).eval()
    opt = attnfx.optimize(model, inputs())
    program = torch.export.export(opt.graph_module, inputs(), strict=False)
    path = tmp_path / "rewritten.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    assert torch.ops.attnfx.bounded_attention.default in [n.target for n in loaded.graph.nodes]
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs()), model(*inputs()), atol=1e-5, rtol=1e-5)


def test_rewritten_model_trains_like_the_original() -> None:
    reference = TinyLM()
    rewritten = copy.deepcopy(reference)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = attnfx.optimize(rewritten, (ids,))
    assert opt.report.entries[0].variant == "attnfx_bounded"
    losses = {}
    for name, module, params in (("reference", reference, reference.parameters()),
                                 ("rewritten", opt, rewritten.parameters())):
        optimizer = torch.optim.SGD(params, lr=0.5)
        losses[name] = []
        for step in range(4):
            logits = module(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["reference"][0] != losses["reference"][-1]  # training moved the weights
    torch.testing.assert_close(losses["rewritten"], losses["reference"], atol=1e-5, rtol=1e-5)
