"""Hessian benchmark: whybn's HVPs and eigensolvers vs PyHessian 0.1 and curvlinops 3.0.1.

Run in the benchmark environment (benchmarks/setup.sh builds benchmarks/.venv):

    benchmarks/.venv/bin/python benchmarks/hessian.py [--quick] [--device cpu|cuda] [--threads 2]
        [--only ResNet-20|MLP-10] [--sections 1,2,3]

Problems (both in train mode with BN, i.e. the loss being trained, at a seeded initialization):
  * ResNet-20 (width 16) on real Fashion-MNIST 1×28×28 (no 3-channel data set is available offline here);
  * a 10-layer BN MLP (width 100) on MNIST-1D.

Sections: 1. time of one HVP / one gradient; 2. top-1 / top-5 eigenvalues (value, wall time, HVPs, relative
error vs a float64 whybn Lanczos reference with a tight tolerance); 3. peak memory of one HVP vs one gradient
(fresh subprocess per measurement; on CPU both the peak RSS, VmHWM reset with /proc/self/clear_refs, and the
peak of live tensor bytes from the profiler's memory events; on CUDA torch.cuda.max_memory_allocated);
4. targets.

PyHessian "as-is on train mode": ``hessian(model, crit, dataloader=[(x, y)], cuda=False)`` and then
``model.train()``: with ``dataloader=`` PyHessian re-runs the forward for every HVP (its ``data=`` path runs the
forward once, in the constructor, in eval mode, so re-setting ``train()`` afterwards would change nothing), so
it then differentiates the batch-statistics loss — and updates BN's running statistics at every HVP.

OpenBLAS: OPENBLAS_NUM_THREADS=1 is set before numpy loads (DESIGN.md: scipy's eigsh threads fought torch's);
whybn's own ``method="scipy"`` limits BLAS threads with threadpoolctl anyway.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/scipy load (DESIGN.md)

import argparse
import copy
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.functional import is_batch_dependent  # noqa: E402
from probes.hessian import hessian_eigenvalues  # noqa: E402
from probes.hvp import hessian_operator  # noqa: E402
from studies.lab.data import load_dataset  # noqa: E402
from studies.lab.nets import make_net  # noqa: E402

SEED = 0
CRIT = nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------------------ setup


def problem_specs(quick: bool) -> list[dict]:
    return [
        dict(
            name="MLP-10",
            arch="mlp",
            dataset="mnist1d",
            data_note="MNIST-1D (40,)",
            in_shape=(40,),
            depth=10,
            width=100,
            batch=128 if quick else 256,
            heavy=True,
        ),
        dict(
            name="ResNet-20",
            arch="resnet",
            dataset="fashion_mnist",
            data_note="Fashion-MNIST 1x28x28 (real data)",
            in_shape=(1, 28, 28),
            depth=20,
            width=16,
            batch=16 if quick else 128,
            heavy=False,  # skip whybn scipy top-5 and PyHessian as-is top-5 (time budget on 2 cores)
        ),
    ]


def make_model(spec: dict) -> nn.Module:
    """The problem's BN network (arch, depth, width from ``spec``), built under the caller's seed."""
    return make_net(
        spec["arch"],
        norm="bn",
        in_shape=spec["in_shape"],
        num_classes=10,
        depth=spec["depth"],
        width=spec["width"],
    )


def build(spec: dict, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    opts = {"n_train": 1000} if spec["dataset"] == "fashion_mnist" else {}
    train, _ = load_dataset(spec["dataset"], **opts)
    x, y = train.tensors[0][: spec["batch"]], train.tensors[1][: spec["batch"]]
    torch.manual_seed(SEED)
    model = make_model(spec)
    return model.to(device).train(), x.to(device), y.to(device).long()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def median_time(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(reps))


def paired_times(a, b, device, reps: int) -> tuple[float, float, list[float]]:
    """``a`` and ``b`` timed alternately after one warm-up each: their median times and the paired ratios
    a_i / b_i. Alternating cancels the machine's slow drifts (frequency, other load), which moved a ratio of
    two medians taken a minute apart by ±10% between runs."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        tb.append(timed(b, device)[0])
        ta.append(timed(a, device)[0])
    return statistics.median(ta), statistics.median(tb), [x / y for x, y in zip(ta, tb, strict=True)]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3) of ``values`` (all three the value itself for one)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def verdict(q1: float, q3: float, bound: float, *, at_most: bool = True) -> str:
    """✓ when the whole interquartile range of the paired ratios meets the bound, ✗ when none of it does,
    and "within spread" when the bound lies inside it: the run cannot tell."""
    if any(v != v for v in (q1, q3)):
        return "not run"
    meets = (lambda v: v <= bound) if at_most else (lambda v: v >= bound)
    if meets(q1) and meets(q3):
        return "✓"
    if not meets(q1) and not meets(q3):
        return "✗"
    return "within spread"


def params_of(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def split(v: torch.Tensor, params) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def bn_state(model: nn.Module) -> tuple[int, float]:
    """(num_batches_tracked, ‖running_mean‖) of the first batch-statistics layer (torch's or whybn's)."""
    for m in model.modules():
        if is_batch_dependent(m) and getattr(m, "running_mean", None) is not None:
            return int(m.num_batches_tracked), float(m.running_mean.norm())
    return -1, float("nan")


def short(e: BaseException, n: int = 110) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------- 1. HVP timing


def plain_gradient(model, x, y):
    params = params_of(model)
    loss = CRIT(model(x), y)
    return torch.autograd.grad(loss, params)


def pyhessian_style_hvp(model, x, y, vs):
    """A fresh loss and gradient graph per HVP (PyHessian's dataloader path / the usual recipe)."""
    params = params_of(model)
    loss = CRIT(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=vs)


def section_hvp(spec, model, x, y, device, reps) -> dict:
    rows = []
    params = params_of(model)
    n = sum(p.numel() for p in params)
    g = torch.Generator(device="cpu").manual_seed(1)
    v = torch.randn(n, generator=g).to(device)
    vs = split(v, params)

    m = copy.deepcopy(model)  # running stats of this copy absorb the plain-gradient forwards
    t_grad = median_time(lambda: plain_gradient(m, x, y), device, reps)
    rows.append(("gradient (torch autograd.grad, train mode)", t_grad, ""))

    def fresh_first():
        with hessian_operator(model, CRIT, (x, y), method="double_backward") as op:
            return op.matvec(v)

    t_first = median_time(fresh_first, device, reps)
    with hessian_operator(model, CRIT, (x, y), method="double_backward") as op:
        op.matvec(v)
        # the target's ratio: one HVP and one gradient timed alternately, per pair
        t_db, _, hvp_ratios = paired_times(
            lambda: op.matvec(v), lambda: plain_gradient(m, x, y), device, reps
        )
    rows.append(("whybn double_backward (graph reused)", t_db, ""))
    rows.append(("whybn double_backward, first HVP incl. graph", t_first, ""))
    with hessian_operator(model, CRIT, (x, y), method="double_backward", cache_graphs=False) as op:
        t_fresh = median_time(lambda: op.matvec(v), device, reps)
    rows.append(("whybn double_backward, cache_graphs=False", t_fresh, "fresh graph per HVP: less memory"))
    try:
        with hessian_operator(model, CRIT, (x, y), method="forward_over_reverse") as op:
            t_fr = median_time(lambda: op.matvec(v), device, reps)
        rows.append(("whybn forward_over_reverse", t_fr, ""))
    except Exception as e:
        rows.append(("whybn forward_over_reverse", float("nan"), "FAILED " + short(e)))

    m = copy.deepcopy(model)
    t_pys = median_time(lambda: pyhessian_style_hvp(m, x, y, vs), device, reps)
    rows.append(("PyHessian-style (fresh graph per HVP, train)", t_pys, ""))

    # PyHessian itself, data=(x, y): graph built once in eval mode in the constructor, then reused
    try:
        from pyhessian import hessian as PyH
        from pyhessian.utils import hessian_vector_product

        m = copy.deepcopy(model)
        h = PyH(m, CRIT, data=(x, y), cuda=device.type == "cuda")
        t_pyh = median_time(lambda: hessian_vector_product(h.gradsH, h.params, vs), device, reps)
        rows.append(("PyHessian 0.1 data= (eval mode, graph reused)", t_pyh, "different network"))
    except Exception as e:
        rows.append(("PyHessian 0.1 data=", float("nan"), "FAILED " + short(e)))

    for mode in ("train", "eval"):
        label = f"curvlinops HessianLinearOperator ({mode})"
        try:
            from curvlinops import HessianLinearOperator

            m = copy.deepcopy(model)
            m.train(mode == "train")
            op = HessianLinearOperator(m, CRIT, params_of(m), [(x, y)], check_deterministic=False)
            t_cl = median_time(lambda: op @ v, device, reps)
            rows.append((label, t_cl, "different network" if mode == "eval" else ""))
        except Exception as e:
            rows.append((label, float("nan"), "FAILED " + short(e)))
    return dict(
        rows=rows, t_grad=t_grad, t_db=t_db, t_first=t_first, t_fresh=t_fresh, hvp_ratios=hvp_ratios, n=n
    )


# ---------------------------------------------------------------------------------- 2. eigenvalues


def references(model, x, y, tol, device, cap) -> dict:
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    out = {}
    for bn in ("batch", "running"):
        t, la = timed(
            lambda: hessian_eigenvalues(
                m64, CRIT, (x64, y), k=5, which="LA", tol=tol, bn=bn, max_matvecs=cap
            ),
            device,
        )
        # λmin only to flag PyHessian's largest-magnitude answer: loose tolerance, small budget
        sa = hessian_eigenvalues(m64, CRIT, (x64, y), k=1, which="SA", tol=1e-2, bn=bn, max_matvecs=cap // 3)
        out[bn] = dict(
            la=np.asarray(la.values),
            sa=float(sa.values[0]),
            conv=la.converged and sa.converged,
            n=la.n_matvecs + sa.n_matvecs,
            t=t,
        )
    return out


def rel_err(vals, ref) -> float:
    vals = np.sort(np.asarray(vals, dtype=float))[::-1]
    ref = ref[: len(vals)]
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


class _Count:
    def __init__(self):
        self.n = 0


def run_pyhessian(model, x, y, device, top_n, max_iter, as_is: bool, tol: float = 1e-3):
    import pyhessian  # noqa: F401  (pyhessian.hessian is the class; the module is in sys.modules)

    ph = sys.modules["pyhessian.hessian"]

    count = _Count()
    orig_hvp = ph.hessian_vector_product
    orig_orth = ph.orthnormal
    per_eig: list[int] = []  # power iterations per eigenvalue: one orthnormal() call per iteration

    def counted(gradsH, params, v):
        count.n += 1
        return orig_hvp(gradsH, params, v)

    def orth(w, eigenvectors):
        i = len(eigenvectors)  # the index of the eigenvalue being computed
        per_eig.extend([0] * (i + 1 - len(per_eig)))
        per_eig[i] += 1
        return orig_orth(w, eigenvectors)

    ph.hessian_vector_product = counted
    ph.orthnormal = orth
    m = copy.deepcopy(model)
    before = bn_state(m)
    torch.manual_seed(SEED)  # PyHessian draws its start vectors from the global RNG
    try:

        def go():
            if as_is:
                h = ph.hessian(m, CRIT, dataloader=[(x, y)], cuda=device.type == "cuda")
                m.train()  # PyHessian set eval(); the dataloader path re-runs the forward per HVP
                orig = h.dataloader_hv_product

                def dl(v):
                    count.n += 1
                    return orig(v)

                h.dataloader_hv_product = dl
            else:
                h = ph.hessian(m, CRIT, data=(x, y), cuda=device.type == "cuda")
            return h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)[0]

        t, vals = timed(go, device)
    finally:
        ph.hessian_vector_product = orig_hvp
        ph.orthnormal = orig_orth
    # PyHessian stops at maxIter per eigenvalue without saying so: an eigenvalue whose power iteration ran
    # maxIter times hit the cap (its tolerance test never passed)
    capped = [i + 1 for i, c in enumerate(per_eig) if c >= max_iter]
    return dict(
        vals=list(vals),
        t=t,
        n=count.n,
        conv=not capped,
        capped=capped,
        bn_before=before,
        bn_after=bn_state(m),
    )


def run_pyhessian_to_accuracy(model, x, y, device, top_n, ref, target=1e-3, max_iter=500):
    """PyHessian (eval mode) with its stopping tolerance tightened (1e-4, 1e-5, 1e-6) until its answer is
    within ``target`` relative error of the running-statistics reference: its cost at equal accuracy.
    Returns the first run that gets there (with the wall time of that run alone), else the last one."""
    res = {}
    for tol in (1e-4, 1e-5, 1e-6):
        res = run_pyhessian(model, x, y, device, top_n, max_iter, as_is=False, tol=tol)
        res["tol"] = tol
        if rel_err(res["vals"], ref) <= target:
            break
    return res


def equal_top1_ratios(model, x, y, device, ref, first: float, tol: float, reps: int) -> list[float]:
    """The equal-terms top-1 ratio, whybn ``bn="running"`` over PyHessian at the tolerance ``tol`` that
    reached 1e-3, timed ``reps`` more times with the two calls alternating (one pair moved by ±5% between
    runs); returns the new ratios. The section's own pair, ``first``, is left out: two other PyHessian runs
    lie between its two calls (it read 0.88 where the adjacent pairs read 0.58–0.67). Both runs are
    seeded, so each repetition gives the same values; one that missed 1e-3 would be an error."""
    del first
    ratios = []
    for _ in range(reps):
        tw, r = timed(lambda: hessian_eigenvalues(model, CRIT, (x, y), k=1, tol=1e-3, bn="running"), device)
        p = run_pyhessian(model, x, y, device, 1, 500, as_is=False, tol=tol)
        if max(rel_err(list(r.values), ref), rel_err(p["vals"], ref)) > 1e-3:
            raise RuntimeError("a repetition missed 1e-3")
        ratios.append(tw / p["t"])
    return ratios


def run_curvlinops(model, x, y, k, mode):
    import scipy.sparse.linalg as sla
    from curvlinops import HessianLinearOperator
    from threadpoolctl import threadpool_limits

    m = copy.deepcopy(model)
    m.train(mode == "train")
    before = bn_state(m)
    t0 = time.perf_counter()
    op = HessianLinearOperator(m, CRIT, params_of(m), [(x, y)], check_deterministic=False)
    sop = op.to_scipy()
    count = _Count()

    def mv(z):
        count.n += 1 if z.ndim == 1 else z.shape[1]
        return sop @ z

    lin = sla.LinearOperator(sop.shape, matvec=mv, matmat=mv, dtype=sop.dtype)
    v0 = np.random.default_rng(SEED).standard_normal(sop.shape[0])
    with threadpool_limits(limits=1, user_api="blas"):
        vals = sla.eigsh(lin, k=k, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)
    return dict(
        vals=list(np.sort(vals)[::-1]),
        t=time.perf_counter() - t0,
        n=count.n,
        conv=True,
        bn_before=before,
        bn_after=bn_state(m),
    )


def section_eigen(spec, model, x, y, device, quick) -> dict:
    max_iter = 10 if quick else 100  # PyHessian's default maxIter
    t_ref0 = time.perf_counter()
    ref = references(
        model,
        x,
        y,
        1e-5 if quick else (1e-8 if spec["heavy"] else 1e-6),
        device,
        600 if spec["heavy"] else (150 if quick else 250),
    )
    t_ref = time.perf_counter() - t_ref0
    rows = []
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}

    def add(label, k, res, refkey, note=""):
        r = ref[refkey]
        vals = res["vals"]
        err = rel_err(vals, r["la"]) if vals else float("nan")
        flag = ""
        if vals:
            top = vals[0] if k == 1 else max(vals, key=abs)
            # a value of the opposite sign to the reference's value at its rank (both sorted descending)
            wrong = [v for v, w in zip(sorted(vals, reverse=True), r["la"], strict=False) if v * w < 0]
            if top < 0 or abs(top - r["sa"]) < abs(top - r["la"][0]):
                flag = "WRONG SIGN/LM: " + f"{top:.4g} vs λmax {r['la'][0]:.4g}, λmin {r['sa']:.4g}"
            elif wrong:
                flag = (
                    "WRONG SIGN: " + ", ".join(f"{v:.4g}" for v in wrong) + " (opposite to the reference's)"
                )
        shown = ", ".join(f"{v:.5g}" for v in vals[:5])
        capped = res.get("capped") or []
        conv = "" if res["conv"] else "not converged" + (f" (cap: eigenvalue {capped})" if capped else "")
        rows.append(
            (label, k, shown, res["t"], res["n"], err, refkey, "; ".join(s for s in (conv, flag, note) if s))
        )
        results[(label, k)] = dict(t=res["t"], err=err, n=res["n"])

    for k in (1, 5):
        for method, label in (("lanczos", "whybn lanczos tol 1e-3"), ("scipy", "whybn scipy eigsh tol 1e-3")):
            if k == 5 and method == "scipy" and not spec["heavy"]:
                rows.append((label, k, "skipped (time budget)", float("nan"), 0, float("nan"), "", ""))
                continue
            t, r = timed(
                lambda: hessian_eigenvalues(model, CRIT, (x, y), k=k, tol=1e-3, method=method), device
            )
            add(label, k, dict(vals=list(r.values), t=t, n=r.n_matvecs, conv=r.converged), "batch")
        # the eval-mode network PyHessian measures, by whybn at the same accuracy
        t_run, r = timed(
            lambda: hessian_eigenvalues(model, CRIT, (x, y), k=k, tol=1e-3, bn="running"), device
        )
        add(
            "whybn lanczos tol 1e-3, bn=running",
            k,
            dict(vals=list(r.values), t=t_run, n=r.n_matvecs, conv=r.converged),
            "running",
            "PyHessian's network",
        )
        try:
            res = run_pyhessian(model, x, y, device, k, max_iter, as_is=False)
            add(f"PyHessian (eval mode) maxIter {max_iter}", k, res, "running", "vs running-stats ref")
            res = run_pyhessian_to_accuracy(model, x, y, device, k, ref["running"]["la"])
            add(
                "PyHessian (eval mode) to 1e-3 rel.err",
                k,
                res,
                "running",
                f"tol {res['tol']:.0e}, maxIter 500",
            )
            if k == 1 and rel_err(res["vals"], ref["running"]["la"]) <= 1e-3:
                results["equal_top1_ratios"] = equal_top1_ratios(
                    model, x, y, device, ref["running"]["la"], t_run / res["t"], res["tol"], 2 if quick else 5
                )
        except Exception as e:
            rows.append(("PyHessian (eval mode)", k, "FAILED", float("nan"), 0, float("nan"), "", short(e)))
        try:
            if k == 5 and not spec["heavy"]:
                raise RuntimeError("skipped (time budget)")
            res = run_pyhessian(model, x, y, device, k, max_iter, as_is=True)
            nb0, rm0 = res["bn_before"]
            nb1, rm1 = res["bn_after"]
            add(
                f"PyHessian as-is train, maxIter {max_iter}",
                k,
                res,
                "batch",
                f"BN1 num_batches_tracked {nb0}->{nb1}, |running_mean| {rm0:.3g}->{rm1:.3g}",
            )
        except Exception as e:
            rows.append(("PyHessian as-is train", k, "FAILED", float("nan"), 0, float("nan"), "", short(e)))
        for mode, refkey in (("train", "batch"), ("eval", "running")):
            label = f"curvlinops + eigsh ({mode})"
            try:
                if k == 5 and not spec["heavy"]:
                    raise RuntimeError("skipped (time budget)")
                res = run_curvlinops(model, x, y, k, mode)
                add(label, k, res, refkey)
            except Exception as e:
                rows.append((label, k, "FAILED", float("nan"), 0, float("nan"), refkey, short(e)))
    untouched = all(torch.equal(state0[k], v) for k, v in model.state_dict().items())
    return dict(rows=rows, ref=ref, t_ref=t_ref, results=results, untouched=untouched, max_iter=max_iter)


# --------------------------------------------------------------------------------------- 3. memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


#: The calls section 3 measures: label → what the child process runs.
MEMORY_CALLS = (
    "gradient",
    "double_backward",
    "double_backward_fresh",
    "forward_over_reverse",
    "pyhessian_style",
)


def _peak_tensor_bytes(fn) -> int:
    """Peak of the live bytes allocated by CPU tensors while ``fn`` runs, from the profiler's memory
    events (allocations +, frees −, in time order): what ``torch.cuda.max_memory_allocated`` is on a GPU,
    and unlike RSS independent of how malloc reuses or returns freed memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (ev.start_ns(), ev.nbytes())
        for ev in prof.profiler.kineto_results.events()
        if ev.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_child(path: str, what: str, device_name: str, threads: int, measure: str) -> None:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    blob = torch.load(path, weights_only=False)
    spec, state, x, y = blob["spec"], blob["state"], blob["x"].to(device), blob["y"].to(device)
    model = make_model(spec)
    model.load_state_dict(state)
    model = model.to(device).train()
    params = params_of(model)
    v = torch.randn(sum(p.numel() for p in params), device=device)
    vs = split(v, params)

    def call():
        if what == "gradient":
            out = plain_gradient(model, x, y)
        elif what == "pyhessian_style":
            out = pyhessian_style_hvp(model, x, y, vs)
        else:  # whybn's operator: built (graph included, when cached) and one HVP
            fresh = what == "double_backward_fresh"
            method = "double_backward" if fresh else what
            with hessian_operator(
                model, CRIT, (x, y), method=method, cache_graphs=False if fresh else None
            ) as op:
                out = op.matvec(v)
        del out

    if measure == "tensors" and device.type == "cpu":
        print(json.dumps({"peak_minus_base": _peak_tensor_bytes(call)}))
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:  # reset the peak-RSS counter (VmHWM); ru_maxrss would include the parent's RSS from before exec
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = _status_kib("VmRSS") * 1024
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"peak_minus_base": peak - base}))


def section_memory(spec, model, x, y, device, threads) -> dict[str, dict[str, float]]:
    """Peak memory of each call in :data:`MEMORY_CALLS`, one fresh subprocess per call and measure:
    ``{"rss": {call: bytes}, "tensors": {call: bytes}}`` (on CUDA both are allocated tensor bytes)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "problem.pt")
        torch.save({"spec": spec, "state": model.state_dict(), "x": x.cpu(), "y": y.cpu()}, path)
        out: dict[str, dict[str, float]] = {"rss": {}, "tensors": {}}
        for measure in ("rss", "tensors") if device.type == "cpu" else ("tensors",):
            for what in MEMORY_CALLS:
                cmd = [sys.executable, __file__, "--_memory", path, what, measure]
                cmd += ["--device", device.type, "--threads", str(threads)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                try:
                    out[measure][what] = json.loads(p.stdout.strip().splitlines()[-1])["peak_minus_base"]
                except Exception:
                    out[measure][what] = float("nan")
                    print(f"  memory {what} ({measure}) failed: {p.stderr.strip().splitlines()[-1:]}")
        if device.type != "cpu":
            out["rss"] = out["tensors"]
    return out


# ----------------------------------------------------------------------------------------- output


def table(header: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(
        str(c).ljust(w[i]) if i == 0 or i == len(r) - 1 else str(c).rjust(w[i]) for i, c in enumerate(r)
    ).rstrip()
    return "\n".join([fmt(header), fmt(["-" * x for x in w]), *map(fmt, rows)])


def fmt_t(t: float) -> str:
    return "n/a" if t != t else (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smaller batches, fewer repetitions (17 min on a 2-core EPYC)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default=None, help="run one problem: ResNet-20 or MLP-10")
    ap.add_argument(
        "--sections",
        default="1,2,3",
        help="comma-separated sections to run (1 HVP time, 2 eigenvalues, 3 memory); default all",
    )
    ap.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        memory_child(*args._memory[:2], args.device, args.threads, measure=args._memory[2])
        return
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or not sections <= {"1", "2", "3"}:
        ap.error(f"--sections: expected a comma-separated subset of 1,2,3, got {args.sections!r}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (5 if args.quick else 9)
    t_start = time.perf_counter()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"# whybn Hessian benchmark  {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: nproc={os.cpu_count()}, CPU {cpu}, {platform.platform()}")
    import pyhessian  # noqa: F401

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, curvlinops {importlib.metadata.version('curvlinops-for-pytorch')}, "
        f"pyhessian 0.1, reps {reps} (median after 1 warm-up), float32; reference float64"
    )
    summary = []
    for spec in problem_specs(args.quick):
        if args.only and spec["name"] != args.only:
            continue
        model, x, y = build(spec, device)
        n = sum(p.numel() for p in params_of(model))
        print(
            f"\n## {spec['name']}  bn, train mode, batch {spec['batch']}, {spec['data_note']}, {n} parameters,"
            f" seeded init (seed {SEED})"
        )
        nan = float("nan")
        hv = dict(rows=[], t_grad=nan, t_db=nan, t_first=nan, t_fresh=nan)
        if "1" in sections:
            t0 = time.perf_counter()
            hv = section_hvp(spec, model, x, y, device, reps)
            print(f"\n### 1. HVP time / gradient time  ({time.perf_counter() - t0:.0f} s)")
            print(
                table(
                    ["method", "time", "/ gradient", "note"],
                    [
                        [l, fmt_t(t), f"{t / hv['t_grad']:.2f}x" if t == t else "-", note]
                        for l, t, note in hv["rows"]
                    ],
                )
            )

        ei = dict(results={}, max_iter=None)
        if "2" in sections:
            t0 = time.perf_counter()
            ei = section_eigen(spec, model, x, y, device, args.quick)
            ref = ei["ref"]
            print(
                f"\n### 2. Top eigenvalues  ({time.perf_counter() - t0:.0f} s; references {ei['t_ref']:.0f} s)"
            )
            for key, what in (
                ("batch", "bn='batch' (train-mode loss)"),
                ("running", "bn='running' (eval network)"),
            ):
                r = ref[key]
                print(
                    f"reference {what}: float64 whybn Lanczos, top-5 LA "
                    f"[{', '.join(f'{v:.7g}' for v in r['la'])}], λmin {r['sa']:.5g}, {r['n']} HVPs, "
                    f"converged {r['conv']}"
                )
            print(
                table(
                    ["method", "k", "values", "wall", "HVPs", "rel.err", "ref", "note"],
                    [
                        [l, k, vals, fmt_t(t), nn_, f"{e:.1e}", rk, note]
                        for l, k, vals, t, nn_, e, rk, note in ei["rows"]
                    ],
                )
            )
            print(f"whybn left the model's parameters and BN buffers untouched: {ei['untouched']}")

        mem = {"rss": {}, "tensors": {}}
        if "3" in sections:
            t0 = time.perf_counter()
            mem = section_memory(spec, model, x, y, device, args.threads)
            cpu_run = device.type == "cpu"
            print(
                f"\n### 3. Peak memory of one call, a fresh subprocess each  ({time.perf_counter() - t0:.0f} s)\n"
                + (
                    "RSS: VmHWM - VmRSS before, peak reset via clear_refs; tensors: peak live bytes of CPU tensors"
                    " (profiler memory events), what torch.cuda.max_memory_allocated measures on a GPU"
                    if cpu_run
                    else "tensors: torch.cuda.max_memory_allocated - memory_allocated before"
                )
            )
            rows = []
            for w in MEMORY_CALLS:
                row = [w]
                for measure in ("rss", "tensors") if cpu_run else ("tensors",):
                    b, g = mem[measure][w], mem[measure]["gradient"]
                    row += [f"{b / 2**20:.1f}", f"{b / g:.2f}x" if g > 0 else "-"]
                rows.append(row)
            header = ["call"] + (["RSS MiB", "/ gradient"] if cpu_run else []) + ["tensors MiB", "/ gradient"]
            print(table(header, rows))

        res = ei["results"]
        pyh = f"PyHessian (eval mode) maxIter {ei['max_iter']}"
        lz = "whybn lanczos tol 1e-3"

        def get(label, k, key):
            return res.get((label, k), {}).get(key, float("nan"))

        def mem_ratio(measure, what):
            b, g = mem[measure].get(what, nan), mem[measure].get("gradient", nan)
            return b / g if g > 0 else nan

        lzr = "whybn lanczos tol 1e-3, bn=running"
        pyacc = "PyHessian (eval mode) to 1e-3 rel.err"
        hq1, hvp_ratio, hq3 = quartiles(hv.get("hvp_ratios") or [nan])
        r1 = get(lz, 1, "t") / get(pyh, 1, "t")
        e1 = get(lz, 1, "err")
        r5 = get(pyh, 5, "t") / get(lz, 5, "t")
        q1s = res.get("equal_top1_ratios") or [get(lzr, 1, "t") / get(pyacc, 1, "t")]
        q1 = statistics.median(q1s)
        eq1 = max(get(lzr, 1, "err"), get(pyacc, 1, "err"))
        q5 = get(pyacc, 5, "t") / get(lzr, 5, "t")
        d1 = get(lzr, 1, "t") / get(pyh, 1, "t")  # same network, PyHessian as it ships
        d5 = get(pyh, 5, "t") / get(lzr, 5, "t")
        eq5 = max(get(lzr, 5, "err"), get(pyacc, 5, "err"))
        mr, mt = mem_ratio("rss", "double_backward"), mem_ratio("tensors", "double_backward")
        fr, ft = mem_ratio("rss", "double_backward_fresh"), mem_ratio("tensors", "double_backward_fresh")
        ok = lambda c, *xs: "not run" if any(v != v for v in xs) else ("✓" if c else "✗")

        def ok_equal(c, ratio, k):
            """The equal-accuracy verdict; no verdict where PyHessian never got within 1e-3 at all."""
            if get(lzr, k, "err") <= 1e-3 < get(pyacc, k, "err"):
                return "no PyHessian run within 1e-3"
            return ok(c, ratio)

        # memory verdicts on tensor bytes: RSS adds what malloc keeps or returns, which moved the same
        # call's ratio by ±15% between runs (it is printed alongside)
        summary += [
            [
                spec["name"],
                "HVP ≤ 2.0× gradient (whybn auto = double_backward, graph reused), paired",
                f"{hvp_ratio:.2f}x (IQR {hq1:.2f}–{hq3:.2f}; first incl. graph {hv['t_first'] / hv['t_grad']:.2f}x)",
                verdict(hq1, hq3, 2.0),
            ],
            [
                spec["name"],
                "top-1 to 1e-3 rel.err in ≤ 0.6× PyHessian's wall time",
                f"{r1:.2f}x, err {e1:.1e}",
                ok(r1 <= 0.6 and e1 <= 1e-3, r1),
            ],
            [
                spec["name"],
                f"  same network (eval) and accuracy (both ≤ 1e-3): whybn / PyHessian wall, median of {len(q1s)}",
                f"{q1:.2f}x ({min(q1s):.2f}–{max(q1s):.2f}), worse err {eq1:.1e}",
                ok_equal(q1 <= 0.6 and eq1 <= 1e-3, q1, 1),
            ],
            [
                spec["name"],
                f"  same network (eval), PyHessian's default (maxIter {ei['max_iter']}, err {get(pyh, 1, 'err'):.1e})",
                f"{d1:.2f}x, err {get(lzr, 1, 'err'):.1e}",
                ok(d1 <= 0.6 and get(lzr, 1, "err") <= 1e-3, d1),
            ],
            [
                spec["name"],
                "top-5 ≥ 5× faster than PyHessian",
                f"{r5:.1f}x faster, err {get(lz, 5, 'err'):.1e}",
                ok(r5 >= 5 and get(lz, 5, "err") <= 1e-3, r5),
            ],
            [
                spec["name"],
                "  same network (eval) and accuracy (both ≤ 1e-3)",
                f"{q5:.1f}x faster, worse err {eq5:.1e}",
                ok_equal(q5 >= 5 and eq5 <= 1e-3, q5, 5),
            ],
            [
                spec["name"],
                f"  same network (eval), PyHessian's default (maxIter {ei['max_iter']}, err {get(pyh, 5, 'err'):.1e})",
                f"{d5:.1f}x faster, err {get(lzr, 5, 'err'):.1e}",
                ok(d5 >= 5 and get(lzr, 5, "err") <= 1e-3, d5),
            ],
            [
                spec["name"],
                "HVP peak memory ≤ 2.5× gradient, tensor bytes (default: graph reused)",
                f"tensors {mt:.2f}x (RSS {mr:.2f}x)",
                ok(mt <= 2.5, mt),
            ],
            [
                spec["name"],
                "  cache_graphs=False (fresh graph per HVP; time in section 1)",
                f"tensors {ft:.2f}x (RSS {fr:.2f}x); HVP {hv['t_fresh'] / hv['t_grad']:.2f}x",
                ok(ft <= 2.5, ft),
            ],
        ]
    print(
        "\n## 4. Targets (whybn on the trained loss, PyHessian = its eval-mode default on the running-statistics"
        " network; indented rows: whybn bn='running', the same network as PyHessian's, against PyHessian run"
        " until it is within 1e-3 (equal accuracy) and as it ships; see section 2)"
    )
    print(table(["problem", "target", "measured", "ok"], summary))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
