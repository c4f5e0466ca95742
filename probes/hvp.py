"""Hessian-vector products of the training loss: the operator every spectral probe is built on.

H = ∇²_θ L(θ) with L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b (DESIGN.md), so H v = Σ_b (n_b/N) H_b v. Two exact ways:

* **double backward** (Pearlmutter 1994): g_b = ∇L_b built once with ``create_graph=True``, then
  H_b v = ∇_θ ⟨g_b, v⟩ = ``autograd.grad(g_b, θ, grad_outputs=v, retain_graph=True)`` for every v;
* **forward-over-reverse**: H_b v = ∂/∂ε ∇L_b(θ + εv) = ``torch.func.jvp(torch.func.grad(L_b), (θ,), (v,))``.

Both differentiate :func:`probes.functional.functional_loss`, i.e. ``functional_call`` in
:func:`~probes.functional.norm_mode`: with ``bn="batch"`` batch-dependent norms use the batch's statistics
(the loss the optimizer sees, unlike PyHessian's eval mode) without updating running statistics.
Both build their graphs under :func:`probes.functional.twice_differentiable`: torch's fused weight norm
(wrong double backward) and CPU flash attention (no double backward) are replaced by their composite forms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from probes.functional import (
    FunctionalLoss,
    grads_or_none,
    outside_callers_modes,
    probe_guard,
    twice_differentiable,
)

__all__ = ["AUTO_METHODS", "METHODS", "HessianOperator", "auto_method", "hessian_operator"]

METHODS = ("auto", "double_backward", "forward_over_reverse")

#: The method ``method="auto"`` takes per device type, and where each choice comes from:
#:
#: * ``"cpu"``: **measured** by ``benchmarks/hessian.py`` (2 threads; ``benchmarks/README.md``, and the
#:   table in :func:`hessian_operator`): one HVP by double backward with the reused graph took 1.71–1.90×
#:   (ResNet-20, two runs on a Xeon; 1.77× paired on an EPYC) and 1.14–1.36× (MLP-10) a gradient, by
#:   forward-over-reverse 3.23–3.87× and 4.00–5.01× (forward-over-reverse also needed about twice the
#:   peak memory).
#: * ``"cuda"``: **not measured**. Double backward is kept, as on CPU, until
#:   ``benchmarks/hessian.py --device cuda`` has timed both methods on a GPU; record that measurement
#:   here and in ``benchmarks/README.md`` before changing this entry.
#:
#: Any other device type falls back to double backward (the only measured choice).
AUTO_METHODS: dict[str, str] = {"cpu": "double_backward", "cuda": "double_backward"}


def auto_method(device: torch.device | str) -> str:
    """The HVP method ``method="auto"`` uses on ``device``'s type: :data:`AUTO_METHODS`.

    CPU: double backward, measured faster (one gradient graph reused for all HVPs of a batch).
    CUDA: double backward too, *unmeasured on GPU* (run ``benchmarks/hessian.py --device cuda``).
    Other device types: double backward.
    """
    return AUTO_METHODS.get(torch.device(device).type, "double_backward")


class HessianOperator:
    """The loss Hessian H (n × n, symmetric) of the chosen parameters as a matrix-free operator.

    ``matvec(v)`` for v of shape ``(n,)`` or ``(n, k)`` (k vectors, k counted in ``n_matvecs``);
    ``to_scipy()`` a float64 ``scipy.sparse.linalg.LinearOperator``; ``gradient()`` and ``loss()`` of
    the same weighted loss; ``unflatten(v)`` splits a flat vector into ``{name: tensor}``. Every public
    call runs under :func:`~probes.functional.probe_guard`, so between calls the model is exactly as
    the caller left it; ``close()`` (or leaving a ``with`` block) frees the cached gradient graphs.
    """

    def __init__(self, f: FunctionalLoss, *, method: str, cache_graphs: bool) -> None:
        self._f = f
        self.method = method
        self.cache_graphs = cache_graphs
        n = f.theta0.numel()
        self.shape: tuple[int, int] = (n, n)
        self.dtype: torch.dtype = f.theta0.dtype
        self.device: torch.device = f.theta0.device
        self.n_matvecs: int = 0
        self.param_names: list[str] = list(f.names)
        self.param_shapes: list[tuple[int, ...]] = list(f.shapes)
        self._graphs: dict[int, tuple[Tensor, Tensor, float]] = {}  # batch → (θ leaf, g_b with graph, L_b)
        self._gradient: Tensor | None = None
        self._loss: float | None = None
        self._closed = False

    # ---------------------------------------------------------------------------------- public

    def matvec(self, v: Tensor) -> Tensor:
        """H v for v of shape ``(n,)``, or H V column by column for V of shape ``(n, k)``."""
        self._check_open()
        if not isinstance(v, Tensor):
            v = torch.as_tensor(v)
        if v.dim() not in (1, 2) or v.shape[0] != self.shape[0]:
            raise ValueError(
                f"v must have shape ({self.shape[0]},) or ({self.shape[0]}, k), got {tuple(v.shape)}"
            )
        cols = v.to(device=self.device, dtype=self.dtype).reshape(self.shape[0], -1)  # (n, k)
        if self._graphs_ready():  # pure autograd on cached graphs of copies: the model is not touched
            with outside_callers_modes():  # a caller's autocast would lower the backward's ops
                out = self._hvp_columns(cols)
        else:
            with probe_guard(self._f.model):
                out = self._hvp_columns(cols)
        self.n_matvecs += cols.shape[1]
        return out.reshape(v.shape)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def to_scipy(self) -> LinearOperator:
        """H as a float64 numpy ``LinearOperator`` (for ``eigsh``); its products count in ``n_matvecs``."""

        def apply(x: np.ndarray) -> np.ndarray:
            out = self.matvec(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))
            return out.detach().cpu().to(torch.float64).numpy()

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply, dtype=np.float64)

    def gradient(self) -> Tensor:
        """∇L(θ) = Σ_b (n_b/N) ∇L_b(θ), flat ``(n,)``."""
        self._check_open()
        if self._gradient is None:
            self._evaluate()
        return self._gradient.clone()

    def loss(self) -> float:
        """L(θ) = Σ_b (n_b/N) L_b(θ)."""
        self._check_open()
        if self._loss is None:
            self._evaluate()
        return self._loss

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Flat ``(n,)`` → ``{parameter name: tensor of its shape}``."""
        return {
            k: t.detach() for k, t in self._f.unflatten(v.to(device=self.device, dtype=self.dtype)).items()
        }

    def close(self) -> None:
        """Free the cached gradient graphs; the operator cannot be used afterwards."""
        self._graphs.clear()
        self._closed = True

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HessianOperator(shape={self.shape}, method={self.method!r}, n_matvecs={self.n_matvecs})"

    # -------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the HessianOperator is closed")

    def _graphs_ready(self) -> bool:
        """Whether a matvec only differentiates cached graphs (no forward pass through the model)."""
        return self.method == "double_backward" and len(self._graphs) == len(self._f.weights)

    def _graph(self, b: int) -> tuple[Tensor, Tensor, float]:
        """(θ leaf, g_b = ∇L_b(θ) with its graph, L_b(θ)); cached when ``cache_graphs``.

        θ is a leaf on the storage of the loss's private copy θ₀ (nothing writes to either; no third
        copy of the parameters) and the frozen tensors are copies, so the graph holds no tensor of the
        model: the guard's in-place restore cannot invalidate it.
        """
        if b in self._graphs:
            return self._graphs[b]
        theta = self._f.theta0.detach().requires_grad_(True)

        def build() -> tuple[Tensor, Tensor]:
            loss = self._f.batch_loss(theta, b)
            return loss, _grad_or_zeros(loss, theta, create_graph=True)

        with torch.enable_grad(), twice_differentiable():
            loss, g = self._f.bound(theta, build)  # bound: a checkpointed forward recomputes at θ
        entry = (theta, g, float(loss.detach()))
        if self.cache_graphs:
            self._graphs[b] = entry
        return entry

    def _hvp_columns(self, cols: Tensor) -> Tensor:
        out: Tensor | None = None
        for b, w in enumerate(self._f.weights):
            if self.method == "double_backward":
                theta, g, _ = self._graph(b)
                last = cols.shape[1] - 1

                def products(theta: Tensor = theta, g: Tensor = g, w: float = w, last: int = last) -> None:
                    nonlocal out
                    for j in range(cols.shape[1]):
                        # an uncached graph is freed by its last product, node by node as the backward
                        # pass goes: its peak memory is then about that of building it, not more
                        keep = self.cache_graphs or j < last
                        if g.requires_grad:
                            (hv,) = torch.autograd.grad(
                                g, theta, grad_outputs=cols[:, j], retain_graph=keep, allow_unused=True
                            )
                        else:  # a gradient constant in θ: L_b is at most linear in the block
                            hv = None
                        hv = torch.zeros_like(theta) if hv is None else hv
                        out = _accumulate(out, cols, j, w, hv.detach())

                self._f.bound(theta, products)  # a checkpointed segment's recomputation sees θ
            else:
                grad_b = torch.func.grad(lambda t, b=b: self._f.batch_loss(t, b))
                for j in range(cols.shape[1]):
                    with twice_differentiable(), _naming_torch_func_limits():
                        _, hv = torch.func.jvp(grad_b, (self._f.theta0,), (cols[:, j],))
                    out = _accumulate(out, cols, j, w, hv.detach())
        return out

    def _evaluate(self) -> None:
        with probe_guard(self._f.model):  # outside a caller's inference_mode, so grad can be summed into
            grad = torch.zeros_like(self._f.theta0)
            loss = 0.0
            for b, w in enumerate(self._f.weights):
                if self.method == "double_backward" and self.cache_graphs:
                    _, g, value = self._graph(b)  # the graph the HVPs reuse
                else:
                    theta = self._f.theta0.detach().requires_grad_(True)

                    def forward_backward(theta: Tensor = theta, b: int = b) -> tuple[Tensor, Tensor]:
                        out = self._f.batch_loss(theta, b)
                        return out, _grad_or_zeros(out, theta, create_graph=False)

                    with torch.enable_grad():
                        out, g = self._f.bound(theta, forward_backward)
                    value = float(out.detach())
                grad += w * g.detach()
                loss += w * value
        self._gradient, self._loss = grad, loss


def _grad_or_zeros(loss: Tensor, theta: Tensor, *, create_graph: bool) -> Tensor:
    """∇_θ loss, and zeros where the loss does not depend on θ: a block that no forward pass uses (an
    auxiliary head outside this loss) has a zero gradient and a zero Hessian, not an autograd error."""
    (g,) = grads_or_none(loss, [theta], create_graph=create_graph)
    return torch.zeros_like(theta) if g is None else g


@contextmanager
def _naming_torch_func_limits() -> Iterator[None]:
    """torch.func's errors for what it cannot transform, as a ``ValueError`` that says what to do
    instead: activation checkpointing (reverse-over-reverse recomputes the segments at θ:
    :meth:`FunctionalLoss.bound`), an ``autograd.Function`` without ``setup_context`` (a module's
    full backward hook, ``register_full_backward_hook``, is one; double backward runs it as autograd
    does), and a buffer changed in place by the forward pass (double backward changes a private copy)."""
    try:
        yield
    except RuntimeError as error:
        if "saved tensor hooks" in str(error):
            what = "activation checkpointing (torch.utils.checkpoint) in the model"
        elif "setup_context" in str(error):
            what = (
                "an autograd.Function without setup_context in the model (a module's full backward hook, "
                "register_full_backward_hook, is one)"
            )
        elif "mutate a captured Tensor" in str(error):
            what = (
                "a forward pass that changes a buffer in place (a call counter, or the running statistics "
                "of a norm layer without torch's track_running_stats)"
            )
        else:
            raise
        raise ValueError(
            f"hvp='forward_over_reverse' (torch.func) cannot differentiate through {what}; "
            "use hvp='double_backward'"
        ) from error


def _accumulate(out: Tensor | None, cols: Tensor, j: int, w: float, hv: Tensor) -> Tensor:
    """``out[:, j] += w · hv`` with ``out`` made on the first product; a single vector's first product
    becomes ``out`` itself (scaled in place), so no second n-vector is held — unless autograd handed
    back a tensor sharing memory with the input vectors (a graph whose backward passes them through)."""
    if out is None:
        if cols.shape[1] == 1:
            if hv.untyped_storage().data_ptr() == cols.untyped_storage().data_ptr():
                hv = hv.clone()
            return (hv if w == 1.0 else hv.mul_(w)).reshape(cols.shape)
        out = torch.zeros_like(cols)
    out[:, j].add_(hv, alpha=w)
    return out


@outside_callers_modes()
def hessian_operator(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    *,
    params: nn.Module | Sequence[str] | Sequence[nn.Parameter] | None = None,
    bn: str = "batch",
    method: str = "auto",
    dtype: torch.dtype | None = None,
    cache_graphs: bool | None = None,
) -> HessianOperator:
    """The Hessian H = ∇²_θ L of L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b as a :class:`HessianOperator`.

    ``params`` selects θ (None: all trainable; a submodule, names or parameters: that diagonal block
    of the full Hessian). ``bn``: ``"batch"`` (the training loss, statistics-free) or ``"running"``.
    ``method``: ``"double_backward"``, ``"forward_over_reverse"`` or ``"auto"`` (:func:`auto_method`,
    picked per device type from these measurements: median time of one HVP / one gradient, CPU,
    2 threads, float32, torch 2.13, train-mode BN; ``benchmarks/README.md``):

    ======================================  ===================  ==============  ====================
    model (batch)                           double backward      no cache        forward-over-reverse
    ======================================  ===================  ==============  ====================
    ResNet-20 width 16, 1×28×28 (128)       1.71 (2.72 first)    2.85            3.64
    … the same, another run (e9100cf)       1.90 (3.02 first)    2.97            3.23
    MLP-10 width 100, MNIST-1D (256)        1.14 (2.75 first)    2.48            4.00
    ======================================  ===================  ==============  ====================

    Double backward reuses the batch's gradient graph ("first": the first HVP, building it too;
    "no cache": ``cache_graphs=False``). GPU: unmeasured (``benchmarks/hessian.py --device cuda``
    measures both); until it is, ``auto`` takes double backward there too (:data:`AUTO_METHODS`).

    ``cache_graphs`` (default: only with a single batch) keeps each batch's gradient graph for all
    HVPs, built here at once (that forward pass is also the input check); without it each matvec
    rebuilds the graphs one batch at a time and frees each with its last product, so at most one is
    held. The trade, measured: peak live tensor bytes of one HVP on ResNet-20 are 3.0× a gradient's
    with the cached graph (the graph, ~2× a gradient's activations, plus the product's own transients)
    and 2.1× without, at 2.9× a gradient's time per product instead of 1.7–1.9×.
    Computation is in the model's dtype: for float64 call ``model.double()`` (and pass float64
    inputs) first; ``dtype``, if given, must equal it. Half precision (float16, bfloat16) is refused
    with a ``ValueError``: probe a float32 copy.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    f = FunctionalLoss.of(model, loss_fn, batches, params=params, bn=bn)
    theta0 = f.theta0
    if dtype is not None and dtype != theta0.dtype:
        raise ValueError(
            f"dtype: the model computes in {theta0.dtype}, not {dtype}; convert the model first "
            f"(e.g. model.double()) — probes compute in the model's dtype"
        )
    low = sorted({str(d) for d in f.dtypes if d not in (torch.float32, torch.float64)})
    if low:
        raise ValueError(
            f"params: Hessian probes compute in float32 or float64, and these parameters are "
            f"{', '.join(low)}, whose second derivatives round away (and whose QR the eigensolvers lack "
            f"on CPU); probe a float32 copy: copy.deepcopy(model).float(), with float32 inputs"
        )
    if method == "auto":
        method = auto_method(theta0.device)
    if cache_graphs is None:
        cache_graphs = len(f.batches) == 1
    op = HessianOperator(f, method=method, cache_graphs=cache_graphs)
    if method == "double_backward" and cache_graphs:
        op._evaluate()  # builds the graphs every HVP reuses; its forward passes validate the batches
    else:
        f.check()  # fail now, not at the first product: non-scalar loss, a batch of one under "batch"
    return op
