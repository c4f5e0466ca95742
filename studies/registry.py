"""The studies, by name. Each is a module ``studies.<name>`` that defines ``STUDY``."""

from __future__ import annotations

import importlib

from studies.lab.study import Study

#: Every study, in the order `whybn all` runs them.
STUDY_NAMES: tuple[str, ...] = (
    "activation_drift",
    "noisy_bn",
    "ics",
    "landscape",
    "hessian_spectrum",
    "norm_zoo",
    "whitening",
    "batch_size",
    "learning_rate",
    "placement",
    "depth",
    "edge_of_stability",
    "scale_invariance",
)


def get_study(name: str) -> Study:
    """The study registered as ``name``; an unknown name raises KeyError listing the known ones."""
    if name not in STUDY_NAMES:
        raise KeyError(f"unknown study {name!r}; known studies: {', '.join(STUDY_NAMES)}")
    return importlib.import_module(f"studies.{name}").STUDY
