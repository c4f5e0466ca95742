"""Architectures: every norm × every arch, double backward, torch.func, options, structure."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from studies.lab import norms
from studies.lab.nets import ACTIVATIONS, ARCHS, make_net
from studies.lab.norms import NEEDS_POSITIONS, NORMS

SHAPES = {"signal": (40,), "channels": (2, 16), "image": (1, 12, 12)}
SMALL = {  # (N, C) layers 16 wide: gn's default 8 groups hold 2 channels (1 is an error)
    "mlp": dict(depth=2, width=16),
    "dln": dict(depth=3, width=16),
    "vgg": dict(depth=3, width=4),
    "resnet": dict(depth=8, width=4),
    "transformer": dict(depth=1, width=16),
}
NO_POSITIONS = {"mlp", "dln", "transformer"}  # archs whose norms see (N, C) inputs


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These nets are tiny: extra intra-op threads only synchronize, and when other processes share the
    2 cores their spin-waiting made this file 15× slower (65 s vs 4.3 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(arch: str, norm: str = "bn", in_shape=(40,), seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return make_net(arch, norm=norm, in_shape=in_shape, num_classes=3, **{**SMALL[arch], **options})


def batch(in_shape, n: int = 8, dtype=torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *in_shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


# --------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_every_arch_forward_backward(norm, arch, shape):
    in_shape = SHAPES[shape]
    if norm in NEEDS_POSITIONS and arch in NO_POSITIONS:
        with pytest.raises(ValueError, match=rf"(?s){arch}.*{norm}.*\(N, C\)"):
            small(arch, norm, in_shape)
        return
    net = small(arch, norm, in_shape).train()
    x, y = batch(in_shape)
    out = net(x)
    assert out.shape == (8, 3)
    nn.functional.cross_entropy(out, y).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(net.eval()(x)).all()


def test_norms_over_single_values_are_refused_in_a_net():
    """A ResNet on 4×4 images ends on 1×1 maps, where instance norm returned its bias: logits that do
    not depend on the input. The forward pass now names the layer's shape instead."""
    net = small("resnet", "in", (1, 4, 4))
    with pytest.raises(ValueError, match=r"InstanceNorm .* input shape \(8, 16, 1, 1\)"):
        net(batch((1, 4, 4))[0])
    with pytest.raises(ValueError, match=r"GroupNorm with 8 groups .* input shape \(8, 8\)"):
        small("mlp", "gn", (40,), width=8)(batch((40,))[0])


# --------------------------------------------------------------------------------------------- autodiff


def _flat_loss(net: nn.Module, x, y):
    names = [n for n, _ in net.named_parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, p in net.named_parameters():
            params[n] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    flat0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    return names, loss, flat0


@pytest.mark.parametrize("norm", ["bn", "ln"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_double_backward_hvp_matches_finite_differences(arch, norm):
    in_shape = (1, 8, 8) if arch in ("vgg", "resnet", "transformer") else (40,)
    net = small(arch, norm, in_shape).double().train()
    for m in net.modules():  # batch statistics without running-stat updates: a pure function
        if hasattr(m, "track_running_stats"):
            m.track_running_stats = False
    x, y = batch(in_shape, dtype=torch.float64)
    _, loss, flat0 = _flat_loss(net, x, y)
    v = torch.randn(flat0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    theta = flat0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    (hvp,) = torch.autograd.grad(g @ v, theta)
    eps = 1e-5
    gp = torch.func.grad(loss)(flat0 + eps * v)
    gm = torch.func.grad(loss)(flat0 - eps * v)
    fd = (gp - gm) / (2 * eps)
    assert (hvp - fd).norm() <= 1e-5 * hvp.norm()
    assert hvp.norm() > 0


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("norm", list(NORMS))
def test_double_backward_runs_for_every_norm(norm, arch):
    """One gradient graph, two HVPs: finite, non-zero and symmetric (uᵀHv = vᵀHu), for every norm."""
    if norm in NEEDS_POSITIONS and arch in NO_POSITIONS:
        pytest.skip("invalid combination (tested above)")
    in_shape = (1, 8, 8)
    net = small(arch, norm, in_shape).double().train()
    for m in net.modules():
        if hasattr(m, "track_running_stats"):
            m.track_running_stats = False
    x, y = batch(in_shape, dtype=torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(5)
    u, v = ([torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params] for _ in range(2))
    torch.manual_seed(0)  # noise norms draw from the global RNG
    gs = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)

    def hvp(w: list[torch.Tensor]) -> list[torch.Tensor]:
        dot = sum((g * wi).sum() for g, wi in zip(gs, w, strict=True))
        return torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)

    hu, hv = hvp(u), hvp(v)
    assert all(h is None or torch.isfinite(h).all() for h in (*hu, *hv))
    u_hv = sum((a * h).sum() for a, h in zip(u, hv, strict=True) if h is not None)
    v_hu = sum((a * h).sum() for a, h in zip(v, hu, strict=True) if h is not None)
    assert abs(u_hv) > 0
    torch.testing.assert_close(u_hv, v_hu, rtol=1e-8, atol=1e-10)


def test_attention_matches_scaled_dot_product_attention():
    net = small("transformer", "ln", (40,), width=8, heads=2)
    attn = net.blocks[0].attn
    x = torch.randn(3, 10, 8)
    n, t, c = x.shape
    q, k, v = attn.qkv(x).reshape(n, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)  # (3, N, H, T, hs)
    ref = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
    torch.testing.assert_close(attn(x), attn.proj(ref))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torch_func_grad_equals_autograd_in_eval_mode(arch):
    in_shape = (1, 8, 8) if arch in ("vgg", "resnet") else (40,)
    net = small(arch, "bn", in_shape)
    x, y = batch(in_shape)
    net.train()(x)  # non-trivial running statistics
    net.eval()
    params = {n: p.detach() for n, p in net.named_parameters()}
    fgrads = grad(lambda p: nn.functional.cross_entropy(functional_call(net, p, (x,)), y))(params)
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(fgrads[n], p.grad, msg=n)


@pytest.mark.parametrize("arch", ["vgg", "transformer"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_torch_func_grad_equals_autograd_with_batch_statistics(norm, arch):
    """The probes' ``bn="batch"`` configuration: train mode, no running-stat updates."""
    if norm in NEEDS_POSITIONS and arch in NO_POSITIONS:
        pytest.skip("invalid combination (tested above)")
    in_shape = (1, 8, 8)
    net = small(arch, norm, in_shape).train()
    for m in net.modules():
        if hasattr(m, "track_running_stats"):
            m.track_running_stats = False
    x, y = batch(in_shape)
    params = {n: p.detach() for n, p in net.named_parameters()}
    torch.manual_seed(0)  # the same noise for both calls (noise norms)
    fgrads = grad(lambda p: nn.functional.cross_entropy(functional_call(net, p, (x,)), y))(params)
    net.zero_grad()
    torch.manual_seed(0)
    nn.functional.cross_entropy(net(x), y).backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(fgrads[n], p.grad, msg=n)


# --------------------------------------------------------------------------------------------- structure


def _forward_order(net: nn.Module, x: torch.Tensor, modules: list[nn.Module]) -> list[nn.Module]:
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in modules]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return order


@pytest.mark.parametrize("arch", ["mlp", "dln", "vgg"])
def test_placement_gives_stated_module_order(arch):
    for placement, names in [("before", ["layer", "norm", "act"]), ("after", ["layer", "act", "norm"])]:
        net = small(arch, "bn", (40,), placement=placement)
        block = net.blocks[-1]
        assert [n for n, _ in block.named_children()][:3] == names
        order = _forward_order(net, torch.randn(4, 40), [getattr(block, n) for n in names])
        assert order == [getattr(block, n) for n in names]


def test_resnet_placement_after_normalizes_block_output():
    net = small("resnet", "bn", (1, 8, 8), placement="after").train()
    block = net.stages[2][0]
    order = _forward_order(net, torch.randn(8, 1, 8, 8), [block.conv1, block.act1, block.norm1, block.norm2])
    assert order == [block.conv1, block.act1, block.norm1, block.norm2]
    out = {}
    h = block.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    net(torch.randn(8, 1, 8, 8))
    h.remove()
    torch.testing.assert_close(out["y"].mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)


def test_mlp_structure_and_activations():
    net = make_net("mlp", norm="bn", in_shape=(40,), num_classes=10, activation="sigmoid")
    assert len(net.blocks) == 3 and net.blocks[0].layer.out_features == 100
    assert net.activations() == [b.act for b in net.blocks]
    assert [n for n, _ in net.named_activations()] == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    assert all(isinstance(a, nn.Sigmoid) for a in net.activations())
    assert net.head.in_features == 100 and net.head.out_features == 10
    dln = make_net("dln", norm="none", in_shape=(40,), num_classes=10)
    assert len(dln.blocks) == 10 and dln.blocks[0].layer.out_features == 50


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activations_are_the_hidden_activation_modules_in_forward_order(arch, shape):
    net = small(arch, "ln", SHAPES[shape])
    kinds = tuple(ACTIVATIONS.values())
    acts = [m for m in net.modules() if isinstance(m, kinds) and m is not getattr(net, "norm", None)]
    acts = [m for m in acts if not (isinstance(m, nn.Identity) and arch == "resnet")]  # shortcuts
    order = _forward_order(net, batch(SHAPES[shape])[0], acts)
    assert net.activations() == order
    named = dict(net.named_modules())
    assert all(named[n] is m for n, m in net.named_activations())
    assert len(order) == len(set(map(id, order))) == len(acts)
    expected = {"mlp": 2, "dln": 3, "vgg": 3, "resnet": 1 + 2 * 3, "transformer": 1}[arch]
    assert len(order) == expected


def test_vgg_stages_widths_and_pooling():
    net = make_net("vgg", norm="bn", in_shape=(40,), num_classes=10)
    widths = [b.layer.out_channels for b in net.blocks]
    assert widths == [16, 16, 32, 32, 64, 64]
    assert [hasattr(b, "pool") for b in net.blocks] == [False, True, False, True, False, False]
    assert all(isinstance(b.layer, nn.Conv1d) for b in net.blocks)
    # 12×12: pools to 6, then 3; a third pool would leave 1 position, so it is skipped
    net = make_net("vgg", norm="bn", in_shape=(3, 12, 12), num_classes=10, depth=8, width=4, per_stage=2)
    assert [hasattr(b, "pool") for b in net.blocks] == [False, True, False, True] + [False] * 4
    assert [b.layer.out_channels for b in net.blocks] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert isinstance(net.blocks[0].layer, nn.Conv2d)
    # widths capped at 8× the base (VGG: 64 → 512), or at max_width
    net = make_net("vgg", norm="none", in_shape=(1, 8, 8), num_classes=2, depth=5, width=2, per_stage=1)
    assert [b.layer.out_channels for b in net.blocks] == [2, 4, 8, 16, 16]
    net = make_net("vgg", norm="none", in_shape=(1, 8, 8), num_classes=2, depth=5, width=2, max_width=6)
    assert [b.layer.out_channels for b in net.blocks] == [2, 2, 4, 4, 6]


def test_in_shape_accepts_numpy_integers():
    import numpy as np

    in_shape = tuple(np.array([1, 12, 12]))
    for arch in ARCHS:
        assert small(arch, "bn", in_shape)(batch((1, 12, 12), n=2)[0]).shape == (2, 3)


def test_resnet20_parameter_count_and_shapes():
    torch.manual_seed(0)
    net = make_net("resnet", norm="bn", in_shape=(3, 32, 32), num_classes=10)
    n = sum(p.numel() for p in net.parameters())
    assert n == 272_474  # He et al. 2016, Table 6: 0.27M (theirs: option A shortcuts, 269,722)
    assert [len(s) for s in net.stages] == [3, 3, 3]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(net.stages[1][0].shortcut.layer, nn.Conv2d)
    assert isinstance(net.stages[0][0].shortcut, nn.Identity)
    net1d = make_net("resnet", norm="bn", in_shape=(40,), num_classes=10, depth=8)
    assert isinstance(net1d.stem.layer, nn.Conv1d)


def test_resnet_without_residual_changes_the_function():
    res = small("resnet", "bn", (1, 8, 8)).eval()
    plain = small("resnet", "bn", (1, 8, 8), residual=False).eval()
    assert all(b.shortcut is None for s in plain.stages for b in s)
    missing, unexpected = plain.load_state_dict(res.state_dict(), strict=False)
    assert not missing and all(".shortcut." in k for k in unexpected)
    x = batch((1, 8, 8))[0]
    assert not torch.allclose(res(x), plain(x))


def test_dln_without_bias_is_linear():
    net = small("dln", "none", (40,), bias=False).double()
    x, z = batch((40,), n=2, dtype=torch.float64)[0]
    a, b = 0.7, -1.9
    torch.testing.assert_close(net((a * x + b * z)[None]), a * net(x[None]) + b * net(z[None]))
    assert make_net("dln", norm="none", in_shape=(40,), num_classes=3, activation="identity").activations()


def test_dln_without_norm_is_affine():
    net = small("dln", "none", (40,)).double()
    x, z = batch((40,), dtype=torch.float64)[0][:2]
    f0 = net(torch.zeros(1, 40, dtype=torch.float64))
    lhs = net((2.0 * x - 3.0 * z)[None]) - f0
    rhs = 2.0 * (net(x[None]) - f0) - 3.0 * (net(z[None]) - f0)
    torch.testing.assert_close(lhs, rhs)
    assert all(isinstance(a, nn.Identity) for a in net.activations())


def test_transformer_prenorm_differs_from_postnorm():
    pre = small("transformer", "ln", (40,), prenorm=True).eval()
    post = small("transformer", "ln", (40,), prenorm=False).eval()
    missing, unexpected = post.load_state_dict(pre.state_dict(), strict=False)
    assert not missing and all(k.startswith("norm.") for k in unexpected)
    x = batch((40,))[0]
    assert not torch.allclose(pre(x), post(x))
    # post-norm: every block's output is layer-normalized per token
    out = {}
    h = post.blocks[0].register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    post(x)
    h.remove()
    assert out["y"].shape == (8, 10, 16)  # (N, T, C): 40 / patch 4 = 10 tokens
    torch.testing.assert_close(out["y"].mean(-1), torch.zeros(8, 10), atol=1e-5, rtol=0)
    assert isinstance(post.norm, nn.Identity)


@pytest.mark.parametrize(
    ("in_shape", "tokens"),
    [((40,), 10), ((2, 40), 10), ((1, 12, 12), 9), ((1, 28, 28), 49), ((3, 32, 32), 64), ((1, 14, 14), 4)],
)
def test_transformer_default_patch(in_shape, tokens):
    net = small("transformer", "ln", in_shape)
    assert net.pos.shape == (1, tokens, 16)
    assert isinstance(net.embed, nn.Conv1d if len(in_shape) < 3 else nn.Conv2d)
    assert net(batch(in_shape, n=2)[0]).shape == (2, 3)


def test_transformer_image_tokens_and_attention_rows():
    net = small("transformer", "ln", (1, 12, 12), patch=4)
    assert net.pos.shape == (1, 9, 16)
    with pytest.raises(ValueError, match="patch"):
        small("transformer", "ln", (1, 10, 10))  # neither 4 nor 7 divides 10
    with pytest.raises(ValueError, match="patch"):
        small("transformer", "ln", (1, 12, 12), patch=5)
    with pytest.raises(ValueError, match="heads"):
        small("transformer", "ln", (40,), heads=3)


# --------------------------------------------------------------------------------------------- init


def _linear_weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in net.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]


def test_init_options_give_documented_statistics():
    def first_layer(init: str) -> nn.Linear:
        torch.manual_seed(0)
        return make_net("mlp", norm="bn", in_shape=(400,), num_classes=10, width=300, depth=1, init=init)

    fan_in, fan_out = 400, 300
    w = first_layer("torch").blocks[0].layer.weight.detach()
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    net = first_layer("kaiming")
    assert net.blocks[0].layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert (net.blocks[0].layer.bias == 0).all() and (net.head.bias == 0).all()
    net = first_layer("xavier")
    expected = math.sqrt(2 / (fan_in + fan_out))
    assert net.blocks[0].layer.weight.std().item() == pytest.approx(expected, rel=0.02)
    w = first_layer("orthogonal").blocks[0].layer.weight.detach()  # (300, 400): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(fan_out), atol=1e-4, rtol=0)
    # convs: fan_in = in_channels · kernel size
    torch.manual_seed(0)
    net = make_net("vgg", norm="bn", in_shape=(1, 12, 12), num_classes=3, width=64, depth=2, init="kaiming")
    conv = net.blocks[1].layer  # 64 → 64, 3×3
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    # norm parameters keep their own init
    assert (net.blocks[0].norm.weight == 1).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_seed_same_parameters(arch):
    a, b, c = small(arch, seed=3), small(arch, seed=3), small(arch, seed=4)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(_linear_weights(a), _linear_weights(c), strict=True))


# --------------------------------------------------------------------------------------------- wrap_layer


class _MarkNorm(norms.NoNorm):
    """A test norm whose wrap_layer wraps the preceding layer, recording it."""

    wrapped: ClassVar[list[nn.Module]] = []

    def wrap_layer(self, layer: nn.Module) -> nn.Module:
        _MarkNorm.wrapped.append(layer)
        return _Wrapped(layer)


class _Wrapped(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.inner = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.inner(x)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_norm_wraps_its_layer(arch, monkeypatch):
    monkeypatch.setitem(NORMS, "mark", _MarkNorm)
    monkeypatch.setattr(_MarkNorm, "wrapped", [])
    for kwargs in [{}, {"prenorm": False}] if arch == "transformer" else [{}]:
        _MarkNorm.wrapped.clear()
        net = small(arch, "mark", (1, 8, 8), **kwargs)
        n_norms = sum(isinstance(m, _MarkNorm) for m in net.modules())
        wrappers = [m for m in net.modules() if isinstance(m, _Wrapped)]
        assert n_norms == len(_MarkNorm.wrapped) == len(wrappers) > 0
        assert {id(w.inner) for w in wrappers} == {id(m) for m in _MarkNorm.wrapped}
        assert all(isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) for m in _MarkNorm.wrapped)
        assert net(batch((1, 8, 8))[0]).shape == (8, 3)


# --------------------------------------------------------------------------------------------- errors


def test_unknown_arch_raises_keyerror_listing_names():
    with pytest.raises(KeyError, match="mlp, dln, vgg, resnet, transformer"):
        make_net("alexnet", norm="bn", in_shape=(40,), num_classes=10)


def test_unknown_norm_raises_keyerror():
    with pytest.raises(KeyError, match="known norms"):
        make_net("mlp", norm="batchnorm", in_shape=(40,), num_classes=10)


@pytest.mark.parametrize(
    ("arch", "options", "error", "match"),
    [
        ("mlp", {"placement": "middle"}, ValueError, "placement"),
        ("vgg", {"activation": "swish"}, ValueError, "activation"),
        ("resnet", {"init": "lecun"}, ValueError, "init"),
        ("resnet", {"depth": 21}, ValueError, "6n"),
        ("mlp", {"depth": 0}, ValueError, "depth"),
        ("mlp", {"residual": False}, TypeError, "residual"),
        ("dln", {"activation": "relu"}, ValueError, "identity"),
        ("vgg", {"prenorm": True}, TypeError, "prenorm"),
        ("transformer", {"placement": "after"}, ValueError, "prenorm"),
        ("mlp", {"norm_options": [1]}, TypeError, "norm_options"),
        ("mlp", {"norm_options": {"momentm": 0.1}}, TypeError, "momentm"),
        ("vgg", {"in_shape": (1, 2, 3, 4)}, ValueError, "in_shape"),
    ],
)
def test_bad_options_raise_clear_errors(arch, options, error, match):
    kwargs = {"norm": "bn", "in_shape": (40,), "num_classes": 3, **options}
    with pytest.raises(error, match=match):
        make_net(arch, **kwargs)


def test_norm_options_reach_every_norm():
    net = make_net("vgg", norm="gn", in_shape=(1, 12, 12), num_classes=3, norm_options={"groups": 2})
    assert all(m.groups == 2 for m in net.modules() if isinstance(m, norms.GroupNorm))
