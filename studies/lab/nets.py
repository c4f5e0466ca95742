"""Architectures, each built with a norm name: ``make_net(arch, norm=..., in_shape=..., num_classes=...)``.

Every net takes ``(N, *in_shape)`` and returns logits ``(N, num_classes)``. ``in_shape`` is one
sample's shape without the batch dimension:

* ``(L,)`` — a 1-D signal (MNIST-1D: ``(40,)``): ``L`` features for the MLPs, one channel of length
  ``L`` for the convolutional nets and the transformer;
* ``(C, L)`` — a multi-channel 1-D signal (``Conv1d``);
* ``(C, H, W)`` — an image (``Conv2d``).

Every norm layer comes from :func:`studies.lab.norms.make_norm` and every linear/conv layer that a norm
follows is passed through that norm's ``wrap_layer`` (weight normalization re-parameterizes it), so no
norm is special-cased by name here.

Common options (each arch lists what it accepts; anything else raises ``TypeError`` naming it):

* ``placement``: ``"before"`` (layer → norm → act, Ioffe & Szegedy 2015) or ``"after"``
  (layer → act → norm);
* ``activation``: one of :data:`ACTIVATIONS` (always ``nn.Module`` instances, never in place, so hooks
  attach to them and double backward works);
* ``norm_options``: keyword arguments passed to every ``make_norm`` call;
* ``init``: weight initialization of every linear/conv layer, one of :data:`INITS`:

  - ``"torch"``: PyTorch's defaults (uniform, Kaiming with a = √5, i.e. std = 1/√(3·fan_in); bias
    uniform in ±1/√fan_in);
  - ``"kaiming"``: He et al. 2015, weights ~ N(0, 2/fan_in) (ReLU gain, whatever the activation);
  - ``"xavier"``: Glorot & Bengio 2010, weights ~ N(0, 2/(fan_in + fan_out));
  - ``"orthogonal"``: Saxe et al. 2014, the weight reshaped to (out, in·kernel) is a (semi-)orthogonal
    matrix, gain 1;

  with every init but ``"torch"`` biases are zero. Norm parameters keep their own init.
* ``bias``: whether linear/conv layers have a bias.

Every net is a :class:`Net` with ``activations() -> list[nn.Module]``: its hidden activation modules
in forward order (``named_activations()`` pairs them with their qualified names), so
``net.activations()[-1]`` is the last hidden layer's activation and a forward-pre-hook on it sees that
activation's input (Ioffe & Szegedy 2015, Fig. 1). Module names (``i``, ``s``, ``j`` count from 0):

* ``mlp``, ``dln``: ``blocks.i.{layer,norm,act}``, ``head``; ``blocks[i]`` is hidden layer i + 1.
* ``vgg``: ``blocks.i.{layer,norm,act[,pool]}``, ``pool`` (global average), ``head``.
* ``resnet``: ``stem.{layer,norm,act}``, ``stages.s.j.{conv1,norm1,act1,conv2,norm2,act2,shortcut}``
  (``shortcut``: ``Identity``, ``Sequential(layer, norm)`` or ``None``), ``pool``, ``head``.
* ``transformer``: ``embed`` (patch conv), ``pos``, ``blocks.i.{norm1,attn.{qkv,proj},norm2,mlp}``
  with ``mlp.{layer,act,fc2}``, ``norm`` (final; ``Identity`` for post-norm), ``head``.

``activations()`` is ``blocks[i].act`` (mlp, dln, vgg); ``stem.act`` then ``act1, act2`` of every block
(resnet); ``blocks[i].mlp.act`` (transformer). A layer that a norm's ``wrap_layer`` replaced keeps its
name (``blocks.0.layer`` is then e.g. a weight-normalized linear layer).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from studies.lab.norms import NEEDS_POSITIONS, NORMS, make_norm

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "gelu": nn.GELU,
}
INITS = ("torch", "kaiming", "xavier", "orthogonal")
PLACEMENTS = ("before", "after")


# --------------------------------------------------------------------------------------------- helpers


class _Builder:
    """Validated common options, and the layer factory that applies them consistently."""

    def __init__(
        self,
        arch: str,
        *,
        norm: str,
        activation: str,
        placement: str,
        init: str,
        bias: bool,
        norm_options: dict | None,
    ) -> None:
        if norm not in NORMS:
            raise KeyError(f"unknown norm {norm!r}; known norms: {', '.join(NORMS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        if norm_options is not None and not isinstance(norm_options, dict):
            raise TypeError(f"norm_options must be a dict, got {type(norm_options).__name__}")
        self.arch = arch
        self.norm_name = norm
        self.activation = activation
        self.placement = placement
        self.init = init
        self.bias = bias
        self.norm_options = dict(norm_options or {})

    def require_positions(self, where: str) -> None:
        """Raise if the norm is undefined on the ``(N, C)`` inputs it would see in this arch."""
        if self.norm_name in NEEDS_POSITIONS:
            raise ValueError(
                f"arch {self.arch!r} cannot use norm {self.norm_name!r}: it normalizes over spatial "
                f"positions, but here it would see (N, C) inputs ({where})"
            )

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()

    def norm(self, num_features: int) -> nn.Module:
        return make_norm(self.norm_name, num_features, **self.norm_options)

    def initialized(self, layer: nn.Module) -> nn.Module:
        """``layer`` with its weight (and bias) set by ``self.init``; ``"torch"`` keeps the defaults."""
        if self.init == "torch":
            return layer
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            elif self.init == "xavier":
                nn.init.xavier_normal_(layer.weight)
            else:
                nn.init.orthogonal_(layer.weight)
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
        return layer

    def linear(self, fan_in: int, fan_out: int, *, bias: bool | None = None) -> nn.Linear:
        bias = self.bias if bias is None else bias
        return self.initialized(nn.Linear(fan_in, fan_out, bias=bias))

    def conv(
        self, dim: int, c_in: int, c_out: int, kernel: int, *, stride: int = 1, padding: int = 0
    ) -> nn.Module:
        conv_cls = nn.Conv1d if dim == 1 else nn.Conv2d
        layer = conv_cls(c_in, c_out, kernel, stride=stride, padding=padding, bias=self.bias)
        return self.initialized(layer)

    def layer_norm_act(self, layer: nn.Module, num_features: int) -> nn.Sequential:
        """``layer → norm → act`` (placement "before") or ``layer → act → norm`` ("after").

        The layer is built (and initialized) before the norm, then passed through ``norm.wrap_layer``.
        """
        norm = self.norm(num_features)
        layer = norm.wrap_layer(layer)
        parts = [("layer", layer), ("norm", norm), ("act", self.act())]
        if self.placement == "after":
            parts[1], parts[2] = parts[2], parts[1]
        return nn.Sequential(OrderedDict(parts))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _signal_shape(in_shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """``(channels, spatial)`` of one sample: ``(L,)`` is one channel of length L."""
    in_shape = tuple(in_shape)
    if not 1 <= len(in_shape) <= 3 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in in_shape
    ):
        raise ValueError(f"in_shape must be (L,), (C, L) or (C, H, W) of positive ints, got {in_shape!r}")
    in_shape = tuple(int(s) for s in in_shape)  # numpy integers → int
    if len(in_shape) == 1:
        return 1, in_shape
    return in_shape[0], in_shape[1:]


# --------------------------------------------------------------------------------------------- base


class Net(nn.Module):
    """Base of every architecture here: ``activations()`` lists the hidden activation modules."""

    def activations(self) -> list[nn.Module]:
        """The hidden activation modules (``nn.Module`` instances) in forward order."""
        raise NotImplementedError

    def named_activations(self) -> list[tuple[str, nn.Module]]:
        """``activations()`` with their qualified names (e.g. ``("blocks.2.act", Sigmoid())``)."""
        names = {id(m): n for n, m in self.named_modules(remove_duplicate=False)}
        return [(names[id(m)], m) for m in self.activations()]


# --------------------------------------------------------------------------------------------- MLP


class MLP(Net):
    """Fully connected net: ``depth`` hidden blocks ``Linear → norm → act`` and a linear head.

    The architecture of Ioffe & Szegedy 2015 (Fig. 1: 3 hidden layers of 100 sigmoid units on MNIST).
    Blocks are ``nn.Sequential`` named ``layer``, ``norm``, ``act`` in forward order, so
    ``net.blocks[i].act`` is the i-th hidden activation. Any input is flattened.
    """

    def __init__(
        self, b: _Builder, in_shape: Sequence[int], num_classes: int, depth: int, width: int
    ) -> None:
        super().__init__()
        b.require_positions("fully connected hidden layers")
        c_in, spatial = _signal_shape(in_shape)
        fan_in = c_in * math.prod(spatial)
        self.blocks = nn.ModuleList(
            b.layer_norm_act(b.linear(fan_in if i == 0 else width, width), width) for i in range(depth)
        )
        self.head = b.linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (N, prod(in_shape))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def activations(self) -> list[nn.Module]:
        return [block.act for block in self.blocks]


def mlp(
    *,
    norm: str,
    in_shape: Sequence[int],
    num_classes: int,
    depth: int | None = None,
    width: int | None = None,
    placement: str = "before",
    activation: str = "relu",
    init: str = "torch",
    bias: bool = True,
    norm_options: dict | None = None,
) -> MLP:
    """Multilayer perceptron (Ioffe & Szegedy 2015, Fig. 1); depth 3, width 100 by default."""
    depth = 3 if depth is None else depth
    width = 100 if width is None else width
    _check_positive(depth=depth, width=width, num_classes=num_classes)
    _signal_shape(in_shape)
    b = _Builder("mlp", norm=norm, activation=activation, placement=placement, init=init, bias=bias,
                 norm_options=norm_options)  # fmt: skip
    return MLP(b, in_shape, num_classes, depth, width)


def dln(
    *,
    norm: str,
    in_shape: Sequence[int],
    num_classes: int,
    depth: int | None = None,
    width: int | None = None,
    placement: str = "before",
    activation: str = "identity",
    init: str = "torch",
    bias: bool = True,
    norm_options: dict | None = None,
) -> MLP:
    """Deep linear network (Santurkar et al. 2018, §2: 25 layers; here depth 10, width 50 by default).

    An :class:`MLP` whose activations are ``nn.Identity`` (still modules, so hooks attach). With norm
    ``"none"`` the whole net is an affine map of its input (linear with ``bias=False``). ``activation``
    is accepted so that a study can pass its activation to every arch, but must be ``"identity"``.
    """
    depth = 10 if depth is None else depth
    width = 50 if width is None else width
    _check_positive(depth=depth, width=width, num_classes=num_classes)
    _signal_shape(in_shape)
    if activation != "identity":
        raise ValueError(f"dln is a deep *linear* network: activation must be 'identity', got {activation!r}")
    b = _Builder("dln", norm=norm, activation="identity", placement=placement, init=init, bias=bias,
                 norm_options=norm_options)  # fmt: skip
    return MLP(b, in_shape, num_classes, depth, width)


# --------------------------------------------------------------------------------------------- VGG


class VGG(Net):
    """VGG-style CNN (Simonyan & Zisserman 2015), small enough for a CPU.

    ``depth`` 3-wide convolutions (padding 1) in stages of ``per_stage``, stage s having
    ``min(width·2^s, max_width)`` channels (VGG doubles 64 → 512, i.e. caps at 8× the base width);
    a max-pool of stride 2 closes each stage but the last while the pooled map keeps at least 2
    positions per spatial dimension (per-position norms such as ``in`` are degenerate on 1 position);
    global average pool; linear head. ``blocks[i]`` is ``nn.Sequential(layer, norm, act[, pool])``
    (``layer, act, norm[, pool]`` with placement "after").
    """

    def __init__(
        self,
        b: _Builder,
        in_shape: Sequence[int],
        num_classes: int,
        depth: int,
        width: int,
        per_stage: int,
        max_width: int,
    ) -> None:
        super().__init__()
        c_in, spatial = _signal_shape(in_shape)
        self.input_shape = (c_in, *spatial)
        dim = len(spatial)
        size = list(spatial)
        blocks = []
        for i in range(depth):
            c_out = min(width * 2 ** (i // per_stage), max_width)
            block = b.layer_norm_act(b.conv(dim, c_in, c_out, 3, padding=1), c_out)
            closes_stage = (i + 1) % per_stage == 0 and i < depth - 1
            if closes_stage and min(size) // 2 >= 2:
                block.add_module("pool", (nn.MaxPool1d if dim == 1 else nn.MaxPool2d)(2))
                size = [s // 2 for s in size]
            blocks.append(block)
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
        self.head = b.linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)  # (N, C, L) or (N, C, H, W)
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x).flatten(1))  # (N, C_last) → (N, classes)

    def activations(self) -> list[nn.Module]:
        return [block.act for block in self.blocks]


def vgg(
    *,
    norm: str,
    in_shape: Sequence[int],
    num_classes: int,
    depth: int | None = None,
    width: int | None = None,
    per_stage: int = 2,
    max_width: int | None = None,
    placement: str = "before",
    activation: str = "relu",
    init: str = "torch",
    bias: bool = True,
    norm_options: dict | None = None,
) -> VGG:
    """VGG-style CNN (Simonyan & Zisserman 2015): 6 conv layers, 2 per stage, widths 16, 32, 64 by default.

    ``max_width`` caps the channel count (default ``8·width``, VGG's 64 → 512).
    """
    depth = 6 if depth is None else depth
    width = 16 if width is None else width
    max_width = 8 * width if max_width is None else max_width
    _check_positive(
        depth=depth, width=width, num_classes=num_classes, per_stage=per_stage, max_width=max_width
    )
    b = _Builder("vgg", norm=norm, activation=activation, placement=placement, init=init, bias=bias,
                 norm_options=norm_options)  # fmt: skip
    return VGG(b, in_shape, num_classes, depth, width, per_stage, max_width)


# --------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """He et al. 2016's basic block: two 3-wide convs and a skip connection.

    placement "before": ``act2(norm2(conv2(act1(norm1(conv1(x))))) + shortcut(x))`` (the original);
    placement "after": ``norm2(act2(conv2(norm1(act1(conv1(x)))) + shortcut(x)))``.
    ``shortcut`` is ``nn.Identity`` when shapes agree, else ``Sequential(layer=1×1 conv, norm)``: He et
    al.'s projection shortcut (option B), where their CIFAR ResNets (§4.2) use option A, a
    parameter-free identity with zero-padded channels (ResNet-20 at width 16: 272,474 parameters
    here, 269,722 with option A); with ``residual=False`` it is ``None`` and the block is a plain
    two-layer stack, so the plain net also loses the two projections (and their norms).
    """

    def __init__(self, b: _Builder, dim: int, c_in: int, c_out: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.placement = b.placement
        self.conv1, self.norm1 = self._conv_norm(b, dim, c_in, c_out, 3, stride, 1)
        self.act1 = b.act()
        self.conv2, self.norm2 = self._conv_norm(b, dim, c_out, c_out, 3, 1, 1)
        self.act2 = b.act()
        self.shortcut: nn.Module | None
        if not residual:
            self.shortcut = None
        elif stride != 1 or c_in != c_out:
            proj, proj_norm = self._conv_norm(b, dim, c_in, c_out, 1, stride, 0)
            self.shortcut = nn.Sequential(OrderedDict(layer=proj, norm=proj_norm))
        else:
            self.shortcut = nn.Identity()

    @staticmethod
    def _conv_norm(
        b: _Builder, dim: int, c_in: int, c_out: int, kernel: int, stride: int, padding: int
    ) -> tuple[nn.Module, nn.Module]:
        conv = b.conv(dim, c_in, c_out, kernel, stride=stride, padding=padding)
        norm = b.norm(c_out)
        return norm.wrap_layer(conv), norm

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut(x) if self.shortcut is not None else None
        if self.placement == "before":
            out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
            return self.act2(out if skip is None else out + skip)
        out = self.conv2(self.norm1(self.act1(self.conv1(x))))
        return self.norm2(self.act2(out if skip is None else out + skip))


class ResNet(Net):
    """CIFAR ResNet (He et al. 2016, §4.2): stem conv, 3 stages of n basic blocks, depth 6n + 2, with
    projection shortcuts where the shape changes (:class:`BasicBlock`; the paper's are option A).

    Stage widths w, 2w, 4w, stride 2 at the start of stages 2 and 3; global average pool; linear head.
    Modules: ``stem`` (``layer``, ``norm``, ``act``), ``stages[s][j]`` (:class:`BasicBlock`), ``head``.
    """

    def __init__(
        self, b: _Builder, in_shape: Sequence[int], num_classes: int, depth: int, width: int, residual: bool
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        c_in, spatial = _signal_shape(in_shape)
        self.input_shape = (c_in, *spatial)
        dim = len(spatial)
        self.stem = b.layer_norm_act(b.conv(dim, c_in, width, 3, padding=1), width)
        stages = []
        c = width
        for s in range(3):
            c_out = width * 2**s
            blocks = [
                BasicBlock(b, dim, c if j == 0 else c_out, c_out, 2 if (s > 0 and j == 0) else 1, residual)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
        self.head = b.linear(c, num_classes, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)  # (N, C, L) or (N, C, H, W)
        x = self.stages(self.stem(x))
        return self.head(self.pool(x).flatten(1))  # (N, 4w) → (N, classes)

    def activations(self) -> list[nn.Module]:
        acts = [self.stem.act]
        for stage in self.stages:
            for block in stage:
                acts += [block.act1, block.act2]
        return acts


def resnet(
    *,
    norm: str,
    in_shape: Sequence[int],
    num_classes: int,
    depth: int | None = None,
    width: int | None = None,
    residual: bool = True,
    placement: str = "before",
    activation: str = "relu",
    init: str = "torch",
    bias: bool = False,
    norm_options: dict | None = None,
) -> ResNet:
    """CIFAR-style ResNet (He et al. 2016); ResNet-20 with w = 16 by default.

    ``bias`` (default False, as He et al.) applies to the convolutions; the head always has a bias.
    ``residual=False`` removes every skip connection (the "plain" net of He et al.).
    """
    depth = 20 if depth is None else depth
    width = 16 if width is None else width
    _check_positive(depth=depth, width=width, num_classes=num_classes)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {residual!r}")
    b = _Builder("resnet", norm=norm, activation=activation, placement=placement, init=init, bias=bias,
                 norm_options=norm_options)  # fmt: skip
    return ResNet(b, in_shape, num_classes, depth, width, residual)


# --------------------------------------------------------------------------------------------- transformer


def _per_token(norm: nn.Module, x: Tensor) -> Tensor:
    """Apply a ``(N, C, *)`` norm to each token of ``x`` of shape ``(N, T, C)``."""
    n, t, c = x.shape
    return norm(x.reshape(n * t, c)).reshape(n, t, c)  # (N·T, C) → (N, T, C)


class Attention(nn.Module):
    """Multi-head softmax self-attention (Vaswani et al. 2017), softmax(q kᵀ/√d) v, in plain torch ops.

    Not ``F.scaled_dot_product_attention``: on CPU (torch 2.13) its backward has no derivative
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"),
    so Hessian-vector products by double backward would fail. The outputs agree (tested).
    """

    def __init__(self, b: _Builder, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = b.linear(width, 3 * width)
        self.proj = b.linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        hs = c // self.heads
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, hs).permute(2, 0, 3, 1, 4)  # (3, N, H, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1)  # (N, H, T, T)
        out = (att @ v).transpose(1, 2).reshape(n, t, c)  # (N, H, T, hs) → (N, T, C)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` or post-norm ``norm1(x + attn(x))``, ...

    Pre-norm (Xiong et al. 2020, ViT) normalizes each sublayer's input, so each norm's ``wrap_layer``
    re-parameterizes the linear layer it feeds (``attn.qkv``, ``mlp.layer``); post-norm (Vaswani et al.
    2017) normalizes each sublayer's output, so it wraps the layer it follows (``attn.proj``, ``mlp.fc2``).
    ``mlp`` is ``Sequential(layer, act, fc2)`` with hidden width ``mlp_ratio·width``.
    """

    def __init__(self, b: _Builder, width: int, heads: int, mlp_ratio: int, prenorm: bool) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.attn = Attention(b, width, heads)
        self.norm1 = b.norm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(
            OrderedDict(layer=b.linear(width, hidden), act=b.act(), fc2=b.linear(hidden, width))
        )
        self.norm2 = b.norm(width)
        if prenorm:
            self.attn.qkv = self.norm1.wrap_layer(self.attn.qkv)
            self.mlp.layer = self.norm2.wrap_layer(self.mlp.layer)
        else:
            self.attn.proj = self.norm1.wrap_layer(self.attn.proj)
            self.mlp.fc2 = self.norm2.wrap_layer(self.mlp.fc2)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, C)
        if self.prenorm:
            x = x + self.attn(_per_token(self.norm1, x))
            return x + self.mlp(_per_token(self.norm2, x))
        x = _per_token(self.norm1, x + self.attn(x))
        return _per_token(self.norm2, x + self.mlp(x))


class Transformer(Net):
    """Small ViT (Dosovitskiy et al. 2021) / 1-D patch transformer.

    Non-overlapping patches (a strided conv ``embed``) → tokens ``(N, T, width)`` + learned positional
    embedding ``pos`` → ``blocks`` → final ``norm`` (pre-norm only; ``nn.Identity`` for post-norm) →
    mean over tokens → linear ``head``. Norms act per token on ``(N·T, C)``, so batch norm's statistics
    run over the batch and the tokens.
    """

    def __init__(
        self,
        b: _Builder,
        in_shape: Sequence[int],
        num_classes: int,
        depth: int,
        width: int,
        patch: int,
        heads: int,
        mlp_ratio: int,
        prenorm: bool,
    ) -> None:
        super().__init__()
        b.require_positions("it normalizes each token's features, shape (N·T, C)")
        if width % heads != 0:
            raise ValueError(f"transformer width {width} must be divisible by heads={heads}")
        c_in, spatial = _signal_shape(in_shape)
        if any(s % patch for s in spatial):
            raise ValueError(
                f"transformer patch {patch} must divide the spatial size {spatial}; pass patch=..."
            )
        self.input_shape = (c_in, *spatial)
        dim = len(spatial)
        tokens = math.prod(s // patch for s in spatial)
        self.embed = b.conv(dim, c_in, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(b, width, heads, mlp_ratio, prenorm) for _ in range(depth)
        )
        self.head = b.linear(width, num_classes)
        self.norm = b.norm(width) if prenorm else nn.Identity()
        if prenorm:
            self.head = self.norm.wrap_layer(self.head)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)  # (N, C, L) or (N, C, H, W)
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, width, T) → (N, T, width)
        for block in self.blocks:
            x = block(x)
        x = _per_token(self.norm, x)
        return self.head(x.mean(dim=1))  # (N, width) → (N, classes)

    def activations(self) -> list[nn.Module]:
        return [block.mlp.act for block in self.blocks]


def transformer(
    *,
    norm: str,
    in_shape: Sequence[int],
    num_classes: int,
    depth: int | None = None,
    width: int | None = None,
    patch: int | None = None,
    heads: int = 4,
    mlp_ratio: int = 2,
    prenorm: bool = True,
    placement: str = "before",
    activation: str = "gelu",
    init: str = "torch",
    bias: bool = True,
    norm_options: dict | None = None,
) -> Transformer:
    """Small ViT / 1-D patch transformer (Dosovitskiy et al. 2021; Xiong et al. 2020 for pre-norm).

    Defaults: 2 blocks, width 64, 4 heads, MLP ratio 2, GELU; ``patch`` 4 for 1-D signals (10 tokens for
    length 40) and for images the first of 4, 7 that divides height and width (32×32 → 64 tokens,
    28×28 → 49, 12×12 → 9); a given ``patch`` must divide every spatial size.
    ``placement`` only accepts ``"before"``: where norms sit is chosen by ``prenorm``.
    """
    depth = 2 if depth is None else depth
    width = 64 if width is None else width
    if patch is None:
        _, spatial = _signal_shape(in_shape)
        fits = [p for p in (4, 7) if all(s % p == 0 for s in spatial)]
        if len(spatial) == 1 or not fits:
            patch = 4  # a 1-D default; an image neither 4 nor 7 divides fails the check below
        else:
            patch = fits[0]
    _check_positive(depth=depth, width=width, num_classes=num_classes, patch=patch, heads=heads,
                    mlp_ratio=mlp_ratio)  # fmt: skip
    if not isinstance(prenorm, bool):
        raise TypeError(f"prenorm must be a bool, got {prenorm!r}")
    if placement != "before":
        raise ValueError(
            f"transformer takes placement='before' only, got {placement!r}; use prenorm=True/False to "
            "move the norms"
        )
    b = _Builder("transformer", norm=norm, activation=activation, placement=placement, init=init, bias=bias,
                 norm_options=norm_options)  # fmt: skip
    return Transformer(b, in_shape, num_classes, depth, width, patch, heads, mlp_ratio, prenorm)


# --------------------------------------------------------------------------------------------- registry

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "dln": dln,
    "vgg": vgg,
    "resnet": resnet,
    "transformer": transformer,
}


def make_net(
    arch: str,
    *,
    norm: str,
    in_shape: Sequence[int],
    num_classes: int,
    depth: int | None = None,
    width: int | None = None,
    **options,
) -> nn.Module:
    """Build architecture ``arch`` with norm ``norm`` for inputs ``(N, *in_shape)``.

    ``depth``/``width`` of ``None`` take the arch's default. Unknown ``arch`` raises ``KeyError``
    listing the known names; an option the arch does not take raises ``TypeError`` naming it.

    >>> net = make_net("mlp", norm="bn", in_shape=(40,), num_classes=10, depth=3, width=100)
    >>> net(torch.randn(8, 40)).shape
    torch.Size([8, 10])
    """
    try:
        builder = ARCHS[arch]
    except KeyError:
        raise KeyError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}") from None
    accepted = [
        p for p in inspect.signature(builder).parameters if p not in ("norm", "in_shape", "num_classes")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"arch {arch!r} takes no option {', '.join(map(repr, unknown))}; it takes {accepted}")
    return builder(norm=norm, in_shape=in_shape, num_classes=num_classes, depth=depth, width=width, **options)
