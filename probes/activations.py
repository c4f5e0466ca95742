"""Hooks as context managers: capture per-layer inputs and outputs, removed on exit.

>>> with capture_layer_inputs(model, layers=[nn.Linear, nn.Conv2d]) as inputs:   # doctest: +SKIP
...     model(x)
>>> inputs["blocks.0.linear"].shape                                              # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "capture",
    "capture_layer_inputs",
    "capture_layer_outputs",
    "feature_axis",
    "floating_inputs",
    "input_reader",
    "layer_parameters",
    "layer_weight_name",
    "layer_weight_names",
    "parameterized_layers",
    "select_modules",
]


def layer_weight_names(module: nn.Module) -> tuple[str, ...]:
    """The parameters that make ``module`` a layer (its weight, W), as names relative to ``module``;
    ``()`` for a module that is not a layer.

    * ``weight_v``: a weight-normalized layer's direction (whybn's wrappers, ``torch.nn.utils.weight_norm``);
    * ``parametrizations.weight.original…``: a weight under ``torch.nn.utils.parametrize``
      (``parametrizations.weight_norm``: its direction ``original1``; ``spectral_norm``, ``orthogonal``:
      ``original``): the largest of the parametrization's own parameters with ≥ 2 dimensions;
    * ``weight``: a weight of ≥ 2 dimensions (Linear, Conv, Embedding) that the module owns itself;
      ``weight_orig`` likewise (the hook-based ``torch.nn.utils.spectral_norm``);
    * otherwise every parameter with ≥ 2 dimensions the module owns whose name starts or ends with
      ``weight``, in registration order: the several weight matrices of one layer, such as an
      ``nn.LSTM``'s ``weight_ih_l0``, ``weight_hh_l0``, … . Such a layer's W is all of them together:
      its norm is that of their concatenation;
    * ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
      ``v_proj_weight``) and ``out_proj.weight``, which the attention reads itself without calling
      ``out_proj`` (a module that never runs, measurable on its own only when named).

    This is the one definition of a "parameterized layer" every probe uses; norm layers (1-D affine
    ``weight``) and containers are not layers, nor is a module for a ≥ 2-D parameter of another name
    (a position embedding). Nothing is computed (a parametrized weight is not evaluated, so a spectral
    norm's power iteration does not run).
    """
    own = dict(module.named_parameters(recurse=False))
    if own.get("weight_v") is not None:
        return ("weight_v",)
    if parametrize.is_parametrized(module, "weight"):
        originals = [
            (p.numel(), i, n)
            for i, (n, p) in enumerate(module.parametrizations.weight.named_parameters(recurse=False))
            if p.dim() >= 2
        ]
        return (f"parametrizations.weight.{max(originals)[2]}",) if originals else ()
    for name in ("weight", "weight_orig"):
        if own.get(name) is not None and own[name].dim() >= 2:
            return (name,)
    matrices = tuple(
        name
        for name, p in own.items()
        if p.dim() >= 2 and (name.startswith("weight") or name.endswith("weight"))
    )
    for child, inner in _read_not_called(module):
        matrices += tuple(f"{child}.{name}" for name in layer_weight_names(inner))
    return matrices


def _read_not_called(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, submodule)`` for the submodules whose parameters ``module`` reads in its own forward
    without calling them: part of its layer (``nn.MultiheadAttention``'s ``out_proj``)."""
    return [("out_proj", module.out_proj)] if isinstance(module, nn.MultiheadAttention) else []


def layer_weight_name(module: nn.Module) -> str | None:
    """The first of :func:`layer_weight_names` (a layer's only weight but for multi-matrix layers such
    as ``nn.LSTM``), or None for a module that is not a layer."""
    names = layer_weight_names(module)
    return names[0] if names else None


def feature_axis(module: nn.Module) -> int:
    """The axis of ``module``'s input that holds its features: −1 for a layer whose weight is a matrix
    (``nn.Linear``, also weight-normalized or parametrized, which acts on the last axis as
    ``F.linear`` does: a transformer's ``(N, T, C)`` tokens are N·T samples of C features), 1 for every
    other module (the ``(N, C, *spatial)`` convention of convolutions and BN). The same for 2-D input."""
    name = layer_weight_name(module)
    return -1 if name is not None and module.get_parameter(name).dim() == 2 else 1


def layer_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that belong to layer ``module``: those it owns directly (weight and bias;
    ``weight_v``, ``weight_g``), those of its ``torch.nn.utils.parametrize`` parametrizations, and for
    ``nn.MultiheadAttention`` those of its ``out_proj``, which it reads without calling it."""
    own = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        own += list(module.parametrizations.parameters())
    for _, inner in _read_not_called(module):
        own += layer_parameters(inner)
    return own


def parameterized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every parameterized layer of ``model`` (:func:`layer_weight_name`), by qualified name, in
    registration order (the root module's name is ``""``)."""
    return {name: m for name, m in model.named_modules() if layer_weight_name(m) is not None}


def select_modules(
    model: nn.Module,
    layers: Sequence[type[nn.Module] | str | nn.Module] | Mapping[str, nn.Module] | None = None,
) -> dict[str, nn.Module]:
    """Named submodules of ``model``: by type, by qualified name, or given as modules (or a name→module map).

    ``None`` selects every leaf module. An entry that matches nothing raises ``ValueError``.
    """
    named = dict(model.named_modules())
    if isinstance(layers, Mapping):
        return dict(layers)
    if layers is None:
        # every leaf, the root too when it is one (a model that is a single nn.Linear)
        return {name: m for name, m in named.items() if not any(True for _ in m.children())}
    by_id = {id(m): name for name, m in named.items()}
    selected: dict[str, nn.Module] = {}
    for entry in layers:
        if isinstance(entry, str):
            if entry not in named:
                raise ValueError(f"layers: the model has no submodule named {entry!r}")
            selected[entry] = named[entry]
        elif isinstance(entry, nn.Module):
            if id(entry) not in by_id:
                raise ValueError(f"layers: {type(entry).__name__} module is not part of the model")
            selected[by_id[id(entry)]] = entry
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            matches = {name: m for name, m in named.items() if isinstance(m, entry)}  # the root too
            if not matches:
                raise ValueError(f"layers: the model has no {entry.__name__} module")
            selected.update(matches)
        else:
            raise TypeError(f"layers: expected module types, names or modules, got {entry!r}")
    return selected


def _first_argument(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module.forward`` (None if it takes none or only ``*args``)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return parameters[0].name if parameters and parameters[0].kind in named else None


def input_reader(module: nn.Module) -> Callable[[tuple, dict[str, Any]], Any]:
    """``read(args, kwargs)`` → ``module``'s input in a call: the first argument of its ``forward``,
    passed by position or by keyword (``fc(input=x)``, ``attn(query=h, key=h, value=h)``); None if
    there is none. For forward hooks registered ``with_kwargs=True``."""
    first = _first_argument(module)

    def read(args: tuple, kwargs: dict[str, Any]) -> Any:
        return args[0] if args else kwargs.get(first) if first is not None else None

    return read


@contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[type[nn.Module] | str | nn.Module] | Mapping[str, nn.Module] | None = None,
    *,
    what: str = "input",
    detach: bool = True,
) -> Iterator[dict[str, list[Tensor]]]:
    """Record the input (``what="input"``) or the output of each selected module.

    The input is the first argument of ``forward``, passed by position or by keyword
    (``attn(query=h, key=h, value=h)``); the output is the returned tensor, or the first element of a
    returned tuple (``nn.MultiheadAttention``, ``nn.LSTM``). Yields ``{name: [tensor per call]}``, filled
    while the block runs; hooks are removed on exit even if the block raises. Tensors are detached
    unless ``detach=False``.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    modules = select_modules(model, layers)
    store: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []

    def hook_for(name: str, read_input: Callable[[tuple, dict[str, Any]], Any]):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if what == "input":
                value = read_input(args, kwargs)
            else:
                value = output[0] if isinstance(output, tuple | list) and output else output
            if isinstance(value, Tensor):
                store[name].append(value.detach() if detach else value)

        return hook

    try:
        for name, module in modules.items():
            hook = hook_for(name, input_reader(module))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_layer_inputs(
    model: nn.Module, layers=None, *, detach: bool = True, must_run: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Like :func:`capture` for inputs, but each layer's calls are concatenated along the batch.

    The dict is filled when the block exits. A layer that never ran raises ``ValueError``; with
    ``must_run=False`` it is left out of the dict instead (a default selection that includes, say, an
    auxiliary head the forward pass does not call). Nothing ran at all: ``ValueError`` either way.
    """
    result: dict[str, Tensor] = {}
    with capture(model, layers, what="input", detach=detach) as store:
        yield result
    _concat_into(result, store, must_run)


@contextmanager
def capture_layer_outputs(
    model: nn.Module, layers=None, *, detach: bool = True, must_run: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Like :func:`capture_layer_inputs`, for outputs."""
    result: dict[str, Tensor] = {}
    with capture(model, layers, what="output", detach=detach) as store:
        yield result
    _concat_into(result, store, must_run)


def _concat_into(result: dict[str, Tensor], store: dict[str, list[Tensor]], must_run: bool) -> None:
    never = [name or "<model>" for name, values in store.items() if not values]
    if never and (must_run or len(never) == len(store)):
        raise ValueError(f"layers never ran during the capture: {', '.join(never)}")
    for name, values in store.items():
        if values:
            result[name] = values[0] if len(values) == 1 else torch.cat(values, dim=0)


def floating_inputs(inputs: dict[str, Tensor], *, named: bool) -> dict[str, Tensor]:
    """The captured layer inputs that are real-valued data: an ``nn.Embedding`` (or any layer fed
    integer or boolean tensors) takes indices, which have no mean, covariance or distribution to
    compare. Such layers are left out of a default selection (``named=False``); a layer the caller
    named explicitly raises ``ValueError``."""
    kept = {name: x for name, x in inputs.items() if x.is_floating_point() or x.is_complex()}
    if named and len(kept) < len(inputs):
        bad = [f"{name!r} ({inputs[name].dtype})" for name in inputs if name not in kept]
        raise ValueError(
            f"layers: {', '.join(bad)} take indices, not real-valued inputs, so their input has no "
            "statistics; select the layers after them"
        )
    if inputs and not kept:
        raise ValueError(f"layers: every selected layer ({', '.join(inputs)}) takes indices, not real values")
    return kept
