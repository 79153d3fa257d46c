"""flashtune.kernel.nn.MultiheadAttention against torch.nn.MultiheadAttention holding the same weights: outputs
and gradients (inputs and parameters) for both layouts, padding masks (the varlen path), attn_mask bool and
float, the is_causal hint, kdim/vdim, torch's fallbacks, and swap_attention in an nn.TransformerEncoder (eval
and a training step). fp32 under the Triton interpreter, E=32 and 4 heads (D=8)."""
from __future__ import annotations

import pytest
import torch
from flashtune.kernel import nn as ftnn
from torch import nn

E, H = 32, 4
TOL = 2e-5


def _pair(device: str, **kwargs) -> tuple[nn.MultiheadAttention, ftnn.MultiheadAttention]:
    """A torch module with fresh random weights (biases too) and a flashtune one loaded from its state dict."""
    ref = nn.MultiheadAttention(E, H, device=device, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)  # biases start at zero in torch: random ones catch a bias left out
    ours = ftnn.MultiheadAttention(E, H, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict())
    ftnn.reset_counts()
    return ref, ours


def _padding(batch: int, seq: int, device: str) -> torch.Tensor:
    """A bool key_padding_mask (True = padding), rows of different lengths, one row unpadded, none empty."""
    lengths = torch.randint(1, seq, (batch,))
    lengths[0] = seq
    lengths[-1] = max(1, seq // 3)
    return (torch.arange(seq)[None, :] >= lengths[:, None]).to(device)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: max error {err}"


def _run(module: nn.Module, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor | None, **kwargs
         ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """(output, input grads, parameter grads) of one forward (and backward when grad_out is given)."""
    module.zero_grad()
    leaves = [t.detach().clone().requires_grad_(grad_out is not None) for t in inputs]
    args = leaves if len(leaves) == 3 else leaves * 3  # one input: self-attention with query is key is value
    out = module(*args, need_weights=False, **kwargs)[0]
    if grad_out is None:
        return out.detach(), [], {}
    (out * grad_out).sum().backward()
    return (out.detach(), [t.grad for t in leaves],
            {n: p.grad for n, p in module.named_parameters() if p.grad is not None})


def _compare(ref: nn.Module, ours: nn.Module, inputs: tuple[torch.Tensor, ...], **kwargs) -> torch.Tensor:
    out_ref = ref(*(inputs if len(inputs) == 3 else inputs * 3), need_weights=False, **kwargs)[0]
    grad_out = torch.randn_like(out_ref)
    o_ref, gi_ref, gp_ref = _run(ref, inputs, grad_out, **kwargs)
    o, gi, gp = _run(ours, inputs, grad_out, **kwargs)
    assert torch.isfinite(o).all()
    _close(o, o_ref, "output")
    for i, (a, b) in enumerate(zip(gi, gi_ref)):
        _close(a, b, f"grad of input {i}")
    assert gp.keys() == gp_ref.keys()
    for name in gp_ref:
        _close(gp[name], gp_ref[name], f"grad of {name}")
    return o


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_matches_torch(kernel_device: str, batch_first: bool) -> None:
    ref, ours = _pair(kernel_device, batch_first=batch_first)
    x = torch.randn((2, 10, E) if batch_first else (10, 2, E), device=kernel_device)
    _compare(ref, ours, (x,))
    assert ftnn.kernel_counts() == {"attention": 1} and not ftnn.fallback_counts()


def test_key_padding_runs_varlen(kernel_device: str) -> None:
    ref, ours = _pair(kernel_device, batch_first=True)
    x = torch.randn(3, 12, E, device=kernel_device)
    kpm = _padding(3, 12, kernel_device)
    out = _compare(ref, ours, (x,), key_padding_mask=kpm)
    assert ftnn.kernel_counts() == {"varlen": 1} and not ftnn.fallback_counts()
    with torch.no_grad():
        unpadded = ours(x, x, x, need_weights=False)[0]
    assert (out - unpadded)[2].abs().max() > 100 * TOL  # the mask changed the padded rows' outputs
    kpm[1] = True  # a batch row with no real key: an empty document, zeros before out_proj as in torch
    with torch.no_grad():
        _close(ours(x, x, x, need_weights=False, key_padding_mask=kpm)[0],
               ref(x, x, x, need_weights=False, key_padding_mask=kpm)[0], "output with an empty row")
    assert ftnn.kernel_counts() == {"varlen": 2, "attention": 1}


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_matches_torch(kernel_device: str, kind: str) -> None:
    ref, ours = _pair(kernel_device)
    b, n = 2, 9
    x = torch.randn(n, b, E, device=kernel_device)
    if kind == "bool":  # per batch·head, True = hidden; the diagonal kept so that no row is fully hidden
        mask = (torch.rand(b * H, n, n, device=kernel_device) < 0.4) & ~torch.eye(n, dtype=torch.bool,
                                                                                   device=kernel_device)
        kpm = torch.zeros(b, n, dtype=torch.bool, device=kernel_device)
        kpm[1, -3:] = True  # with a padding mask as well: the masks are merged (the masked path, not varlen)
        kwargs = {"attn_mask": mask, "key_padding_mask": kpm}
    else:
        mask = torch.randn(n, n, device=kernel_device) * 2
        kwargs = {"attn_mask": mask}
    out = _compare(ref, ours, (x,), **kwargs)
    assert ftnn.kernel_counts() == {"attention": 1}
    with torch.no_grad():
        plain = ours(x, x, x, need_weights=False)[0]
    assert (out - plain).abs().max() > 100 * TOL


def test_is_causal_hint(kernel_device: str) -> None:
    ref, ours = _pair(kernel_device, batch_first=True)
    n = 11
    x = torch.randn(2, n, E, device=kernel_device)
    causal = nn.Transformer.generate_square_subsequent_mask(n, device=kernel_device)
    out = _compare(ref, ours, (x,), attn_mask=causal, is_causal=True)
    with torch.no_grad():
        full = ours(x, x, x, need_weights=False)[0]
    assert (out - full).abs().max() > 100 * TOL
    # torch takes the hint without reading the mask (need_weights=False, no padding): so does flashtune
    _compare(ref, ours, (x,), attn_mask=torch.zeros(n, n, device=kernel_device), is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):  # torch's rule: the hint needs the mask
        ours(x, x, x, need_weights=False, is_causal=True)


def test_kdim_vdim_cross_attention_with_padding(kernel_device: str) -> None:
    ref, ours = _pair(kernel_device, kdim=24, vdim=16, batch_first=True)
    q, k, v = (torch.randn(s, device=kernel_device) for s in ((3, 7, E), (3, 13, 24), (3, 13, 16)))
    kpm = _padding(3, 13, kernel_device)
    _compare(ref, ours, (q, k, v), key_padding_mask=kpm)
    _compare(ref, ours, (q, k, v))
    assert ftnn.kernel_counts() == {"varlen": 1, "attention": 1}


def test_need_weights_and_bias_kv_fall_back(kernel_device: str) -> None:
    ref, ours = _pair(kernel_device, batch_first=True)
    x = torch.randn(2, 8, E, device=kernel_device)
    out_ref, w_ref = ref(x, x, x, average_attn_weights=False)
    out, w = ours(x, x, x, average_attn_weights=False)  # need_weights defaults to True, as in torch
    assert w is not None and torch.equal(w, w_ref) and torch.equal(out, out_ref)
    ref, ours = _pair(kernel_device, add_bias_kv=True, add_zero_attn=True)
    out = ours(x, x, x, need_weights=False)[0]
    assert torch.equal(out, ref(x, x, x, need_weights=False)[0])
    assert ftnn.fallback_counts() == {"add_bias_kv": 1} and not ftnn.kernel_counts()
    ref, ours = _pair(kernel_device, batch_first=True, dtype=torch.float64)  # a dtype the kernels do not take
    x, kpm = x.double(), _padding(2, 8, kernel_device)
    out = ours(x, x, x, need_weights=False, key_padding_mask=kpm)[0]
    reasons = ftnn.fallback_counts()
    assert len(reasons) == 1 and next(iter(reasons)).startswith("kernel refuses the inputs")
    assert not ftnn.kernel_counts()
    assert torch.equal(out, ref(x, x, x, need_weights=False, key_padding_mask=kpm)[0])


def test_state_dict_round_trip_and_bad_mask(kernel_device: str) -> None:
    ref, ours = _pair(kernel_device, kdim=24, vdim=16)
    assert isinstance(ours, nn.MultiheadAttention)
    back = nn.MultiheadAttention(E, H, kdim=24, vdim=16)
    back.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for name, t in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)
    _, ours = _pair(kernel_device)
    x = torch.randn(6, 2, E, device=kernel_device)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool,
                                                                                   device=kernel_device))


def test_swap_attention_in_transformer_encoder(kernel_device: str) -> None:
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True, device=kernel_device)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    model.load_state_dict(ref.state_dict())
    params = [p for p in model.parameters()]
    ftnn.reset_counts()
    assert ftnn.swap_attention(model) == 2
    assert all(isinstance(m.self_attn, ftnn.MultiheadAttention) for m in model.layers)
    assert [p for p in model.parameters()] == params  # the same Parameter objects: optimizers stay valid
    assert ftnn.swap_attention(model) == 0
    # a layer built with the flashtune module: its fused inference path is off too
    built = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True, device=kernel_device)
    built.self_attn = ftnn.MultiheadAttention(E, H, batch_first=True, device=kernel_device)
    built.eval()
    with torch.no_grad():
        built(torch.randn(2, 6, E, device=kernel_device))
    assert ftnn.kernel_counts() == {"attention": 1}
    ftnn.reset_counts()
    x = torch.randn(3, 10, E, device=kernel_device)
    kpm = _padding(3, 10, kernel_device)
    # eval without grad: torch's model takes its fused fast paths (nested tensors), the swapped one runs ours
    ref.eval()
    model.eval()
    with torch.no_grad():
        out_ref = ref(x, src_key_padding_mask=kpm)
        out = model(x, src_key_padding_mask=kpm)
    assert ftnn.kernel_counts() == {"varlen": 2} and not ftnn.fallback_counts()
    real = ~kpm  # torch's nested path leaves padded positions at 0
    _close(out[real], out_ref[real], "eval output")
    # a training step: the gradients of every parameter, the padded positions included
    ref.train()
    model.train()
    grad_out = torch.randn(3, 10, E, device=kernel_device)
    for m in (ref, model):
        m.zero_grad()
        (m(x, src_key_padding_mask=kpm) * grad_out).sum().backward()
    assert ftnn.kernel_counts() == {"varlen": 4}
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        _close(p.grad, p_ref.grad, f"grad of {name}")


def test_unbatched_and_dropout(kernel_device: str) -> None:
    ref, ours = _pair(kernel_device, dropout=0.3)
    x = torch.randn(9, E, device=kernel_device)
    kpm = _padding(1, 9, kernel_device)[0]
    ref.eval()
    ours.eval()  # dropout off, as in torch: the padded call packs its keys
    _compare(ref, ours, (x,), key_padding_mask=kpm)
    assert ftnn.kernel_counts() == {"varlen": 1}
    ours.train()  # dropout on: the kernel's dropout, in the masked path (the varlen kernels have none)
    with torch.no_grad():
        dropped = ours(x, x, x, need_weights=False, key_padding_mask=kpm)[0]
        kept = ref(x, x, x, need_weights=False, key_padding_mask=kpm)[0]
    assert ftnn.kernel_counts() == {"varlen": 1, "attention": 1}
    assert dropped.shape == kept.shape and torch.isfinite(dropped).all()
    assert (dropped - kept).abs().max() > 100 * TOL


@pytest.mark.gpu
def test_swapped_encoder_bf16_gpu() -> None:
    layer = nn.TransformerEncoderLayer(256, 4, dim_feedforward=512, dropout=0.0, batch_first=True, device="cuda",
                                       dtype=torch.bfloat16)
    ref = nn.TransformerEncoder(layer, 2)
    model = nn.TransformerEncoder(layer, 2)
    model.load_state_dict(ref.state_dict())
    assert ftnn.swap_attention(model) == 2
    ftnn.reset_counts()
    x = torch.randn(4, 200, 256, device="cuda", dtype=torch.bfloat16)
    kpm = _padding(4, 200, "cuda")
    grad_out = torch.randn_like(x)
    outs, grads = [], []
    for m in (ref, model):
        m.train()
        m.zero_grad()
        out = m(x, src_key_padding_mask=kpm)
        (out.float() * grad_out).sum().backward()
        outs.append(out.float())
        grads.append([p.grad.float() for p in m.parameters()])
    assert ftnn.kernel_counts() == {"varlen": 2, "attention": 1}
    assert (outs[0] - outs[1]).abs().max() <= 5e-2 * outs[0].abs().max()
    for g_ref, g in zip(*grads):
        assert (g - g_ref).abs().max() <= 5e-2 * g_ref.abs().max() + 1e-3
