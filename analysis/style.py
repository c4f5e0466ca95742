"""One house style for every figure: a fixed colour per norm (colour-blind safe), vector PDF + PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window

import matplotlib.pyplot as plt
import seaborn as sns

__all__ = [
    "NORM_LABELS",
    "NORM_ORDER",
    "labeled_legend",
    "norm_palette",
    "save_figure",
    "use_style",
]

#: The order in which norms appear in every legend and table.
NORM_ORDER = ("none", "bn", "noisy_bn", "noise", "lp_bn", "ln", "gn", "in", "dbn", "iternorm", "wn")
NORM_LABELS = {
    "none": "no norm",
    "bn": "BatchNorm",
    "noisy_bn": "noisy BN",
    "noise": "noise only",
    "lp_bn": "ℓp BN",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "in": "InstanceNorm",
    "dbn": "DBN (ZCA)",
    "iternorm": "IterNorm",
    "wn": "WeightNorm",
}
# Okabe–Ito, the colour-blind-safe palette, then seaborn's colorblind set for the rest.
_COLORS = ["#000000", "#0072B2", "#D55E00", "#CC79A7", "#009E73", "#E69F00", "#56B4E9", "#F0E442"]
_COLORS += sns.color_palette("colorblind").as_hex()


def norm_palette(norms: tuple[str, ...] | list[str] = NORM_ORDER) -> dict[str, str]:
    """A colour per norm, the same in every figure whatever subset is drawn."""
    fixed = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(NORM_ORDER)}
    extra = [n for n in norms if n not in fixed]
    fixed.update({n: _COLORS[(len(NORM_ORDER) + i) % len(_COLORS)] for i, n in enumerate(extra)})
    return {n: fixed[n] for n in norms} if norms is not NORM_ORDER else fixed


def ordered_norms(present) -> list[str]:
    """The norms in ``present`` in house order (unknown ones last, alphabetically)."""
    present = set(present)
    return [n for n in NORM_ORDER if n in present] + sorted(present - set(NORM_ORDER))


def labeled_legend(ax: Any, labels: Mapping[str, str] = NORM_LABELS, **options: Any) -> Any:
    """Draw ``ax``'s legend with each entry's name shown as ``labels[name]`` (a name without a label
    stays as it is): seaborn names hue entries by their value (``"bn"``), the figure shows the label.

    ``options`` go to ``ax.legend`` (``loc``, ``fontsize``, ...); returns the legend.
    """
    handles, names = ax.get_legend_handles_labels()
    return ax.legend(handles, [labels.get(name, name) for name in names], **options)


def use_style() -> None:
    """Apply the house style (call before drawing)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.0)
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
            "axes.titlesize": "medium",
            "legend.frameon": False,
        }
    )


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<name>.pdf`` and ``.png`` and close it; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    for path in paths:
        fig.savefig(path, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)
    return paths
