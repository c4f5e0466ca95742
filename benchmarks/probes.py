"""What each probe costs, in units of one gradient evaluation, on ResNet-20 and a 10-layer BN MLP.

Runs in the project's environment (no peer tools needed)::

    .venv/bin/python benchmarks/probes.py [--quick] [--device cpu|cuda] [--threads 2]

Same problems as ``benchmarks/hessian.py`` (train-mode BN at a seeded initialization). Each probe's wall
time and one plain gradient (forward + backward) on the same batch are timed alternately after a
warm-up; "÷ gradient" is the median of the per-repetition ratios and "paired IQR" their interquartile
range. Bounds from the issue: ``ics_gradient_change`` ≤ layers + 1 gradients (layers:
``parameterized_layers``, which counts ResNet-20's two 1×1 projection convs: 22), and
``landscape_along_gradient`` ≤ grid size + 1 gradients. ✓ when the whole IQR is within the bound, ✗ when
none of it is, "within spread" when the bound lies inside it. The probes' own counts
(``ICSResult.n_gradients``, ``Landscape.n_grad_evals``) are printed next to the measured ratios.

The landscape probe's evaluations are gradients at other weights (w − ηg). Two last rows therefore
time it against :func:`landscape_by_hand`, plain autograd at the same grid + 1 points with no guard and
no checks (after checking that both give the same losses), and against grid + 1 plain gradients at w,
back to back: those ratios are the probe's own overhead. A single gradient timed alone between probe
calls is not quite one ninth of nine timed back to back; that difference is in the "÷ gradient" column.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before torch loads numpy, as in hessian.py

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.hessian import (  # noqa: E402
    build,
    median_time,
    paired_times,
    plain_gradient,
    problem_specs,
    quartiles,
    table,
    verdict,
)
from probes import (  # noqa: E402
    hessian_eigenvalues,
    hessian_trace,
    ics_gradient_change,
    kfac_factor_conditioning,
    landscape_along_gradient,
    layer_gradient_norms,
    layer_input_conditioning,
    rank_collapse,
)
from probes.activations import parameterized_layers  # noqa: E402
from probes.functional import in_one_allocation  # noqa: E402

GRID = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)


def trained_optimizer(model, x, y) -> torch.optim.Optimizer:
    """SGD with momentum after two real steps on a copy of the batch, so its state is non-trivial."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.load_state_dict(state)  # the weights as they were; the optimizer keeps its momentum
    opt.zero_grad(set_to_none=True)
    return opt


def landscape_by_hand(model, x, y, grid) -> list[float]:
    """L(w − ηg) for η in ``grid`` by plain autograd: the gradient at w, then a forward and backward pass
    at each w − ηg (its gradient's distance to g computed as the probe does), the weights put back.
    The baseline for the probe's overhead, written as well as plain code can be: g is held in one
    buffer and each point's gradient is freed before the next pass (holding autograd's own gradient
    tensors across passes costs 16–20 thousand page faults per call on ResNet-20, see
    :func:`probes.functional.in_one_allocation`). Train mode, so BN's running statistics move as in
    :func:`plain_gradient`."""
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    g = in_one_allocation(torch.autograd.grad(F.cross_entropy(model(x), y), params))
    losses = []
    for eta in grid:
        with torch.no_grad():
            torch._foreach_copy_(params, w0)
            torch._foreach_add_(params, g, alpha=-eta)
        loss = F.cross_entropy(model(x), y)
        grad = list(torch.autograd.grad(loss, params))
        torch._foreach_sub_(grad, g)
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grad)))
        losses.append(float(loss.detach()))
        del loss, grad
    with torch.no_grad():
        torch._foreach_copy_(params, w0)
    return losses


def gradients_back_to_back(model, x, y, n: int) -> None:
    """``n`` plain gradients at w, one after another: the work the landscape probe cannot avoid."""
    for _ in range(n):
        plain_gradient(model, x, y)


def interleaved_medians(
    probe, gradient, device: torch.device, reps: int
) -> tuple[float, float, tuple[float, float, float]]:
    """Median wall times of ``probe`` and of ``gradient``, timed alternately after one warm-up each, and
    the quartiles (Q1, median, Q3) of the paired ratios probe_i / gradient_i: the ratio and its spread.

    Alternating the two cancels slow drifts of the machine (frequency, other load) that would bias a ratio
    of two medians taken minutes apart (:func:`benchmarks.hessian.paired_times`)."""
    tp, tg, ratios = paired_times(probe, gradient, device, reps)
    return tp, tg, quartiles(ratios)


def run(spec: dict, device: torch.device, reps: int) -> list[list[str]]:
    model, x, y = build(spec, device)
    batch = (x, y)
    n_layers = len(parameterized_layers(model))
    grad_time = median_time(lambda: plain_gradient(model, x, y), device, reps=max(reps, 5))
    opt = trained_optimizer(model, x, y)
    ics = ics_gradient_change(model, F.cross_entropy, batch, opt)
    land = landscape_along_gradient(model, F.cross_entropy, batch, step_sizes=GRID)
    probes = {
        "ics_gradient_change": (
            lambda: ics_gradient_change(model, F.cross_entropy, batch, opt),
            f"≤ {n_layers + 1} (layers+1); counts {ics.n_gradients}",
            n_layers + 1,
        ),
        "landscape_along_gradient": (
            lambda: landscape_along_gradient(model, F.cross_entropy, batch, step_sizes=GRID),
            f"≤ {len(GRID) + 1} (grid+1); counts {land.n_grad_evals}",
            len(GRID) + 1,
        ),
        "layer_gradient_norms": (lambda: layer_gradient_norms(model, F.cross_entropy, batch), "", None),
        "layer_input_conditioning": (lambda: layer_input_conditioning(model, batch), "", None),
        "rank_collapse": (lambda: rank_collapse(model, batch), "", None),
        "kfac_factor_conditioning": (
            lambda: kfac_factor_conditioning(model, F.cross_entropy, batch),
            "",
            None,
        ),
        "hessian_trace (20 probes)": (
            lambda: hessian_trace(model, F.cross_entropy, batch, n_probes=20),
            "",
            None,
        ),
        "hessian_eigenvalues top-1": (
            lambda: hessian_eigenvalues(model, F.cross_entropy, batch, k=1),
            "",
            None,
        ),
    }
    rows = []
    for name, (fn, bound_text, bound) in probes.items():
        t, _, (q1, ratio, q3) = interleaved_medians(fn, lambda: plain_gradient(model, x, y), device, reps)
        mark = "" if bound is None else verdict(q1, q3, bound)
        rows.append(
            [
                spec["name"],
                name,
                f"{t * 1e3:.1f} ms",
                f"{ratio:.2f}",
                f"{q1:.2f}–{q3:.2f}",
                bound_text,
                mark,
            ]
        )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    by_hand = landscape_by_hand(model, x, y, GRID)
    model.load_state_dict(state)  # running statistics as they were
    if not torch.allclose(
        torch.tensor(by_hand), torch.as_tensor(land.losses, dtype=torch.float32), rtol=1e-4
    ):
        raise RuntimeError(f"landscape_by_hand disagrees with the probe: {by_hand} vs {land.losses.tolist()}")
    n = len(GRID) + 1
    baselines = {  # row name: (the same work in plain autograd, how to describe its time h)
        "landscape ÷ by hand, same points": (
            lambda: landscape_by_hand(model, x, y, GRID),
            lambda h: f"plain autograd loop {h * 1e3:.1f} ms",
        ),
        f"landscape ÷ {n} gradients at w": (
            lambda: gradients_back_to_back(model, x, y, n),
            lambda h: f"{n} back to back {h * 1e3:.1f} ms = {h / grad_time:.2f} gradients",
        ),
    }
    for name, (baseline, describe) in baselines.items():
        t, h, (q1, ratio, q3) = interleaved_medians(
            lambda: landscape_along_gradient(model, F.cross_entropy, batch, step_sizes=GRID),
            baseline,
            device,
            reps,
        )
        model.load_state_dict(state)  # running statistics as they were
        rows.append(
            [spec["name"], name, f"{t * 1e3:.1f} ms", f"{ratio:.3f}", f"{q1:.3f}–{q3:.3f}", describe(h), ""]
        )
    rows.insert(
        0, [spec["name"], "one gradient", f"{grad_time * 1e3:.1f} ms", "1.00", "", f"{n_layers} layers", ""]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, fewer repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = 3 if args.quick else 11
    rows = []
    for spec in problem_specs(args.quick):
        rows += run(spec, device, reps)
    print(
        f"probe cost in gradients — {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, device {device}{' (quick)' if args.quick else ''}"
    )
    print(table(["problem", "probe", "time", "÷ gradient", "paired IQR", "bound / own count", ""], rows))


if __name__ == "__main__":
    main()
