"""Check a study's planned runs before any of them trains: every name is known, every dataset is there.

``validate_runs(study, plan_runs(study, config))`` looks at each run config of the grid and raises one
error listing every distinct problem, each naming the field, the bad value and the accepted values::

    ValueError: study 'norm_zoo': norm 'foo' is not a known normalization; known: none, bn, ln, ...

What it checks, per run config (the fields of the ``Study`` protocol and those the nets take):

* ``arch``, ``norm``, ``dataset`` and ``seed`` are present;
* ``arch`` is in :data:`studies.lab.nets.ARCHS`, ``norm`` in :data:`studies.lab.norms.NORMS`, ``dataset``
  in :data:`studies.lab.data.DATASETS` — or is one of the few names a study's own ``run`` handles itself
  (:data:`STUDY_EXTRA_NAMES`);
* ``activation``, ``init`` and ``placement`` (the nets' options), ``optimizer`` and ``schedule`` (the
  training loop's) and ``probe_bn`` (the probes' ``bn`` mode), where a run config has them, are among
  :data:`~studies.lab.nets.ACTIVATIONS`, :data:`~studies.lab.nets.INITS`,
  :data:`~studies.lab.nets.PLACEMENTS`, :data:`~studies.lab.train.OPTIMIZERS`,
  :data:`~studies.lab.train.SCHEDULES` and :data:`probes.functional.BN_MODES`;
* the norm options a study passes from the run config (:data:`NORM_OPTION_FIELDS`: ``groups`` of ``gn``,
  ``p`` of ``lp_bn``, ...) are accepted by the norm's constructor (it is built once, on 16 channels);
* a norm that needs spatial positions (``in``) is not put in an arch that has none (``mlp``, ``dln``,
  ``transformer``), as :func:`studies.lab.nets.make_net` would refuse;
* every ``*_every`` field (``probe_every``, ``ladder_log_every``, ...) is an int >= 1, and so is every
  size or count a study reads from its run config (:func:`_is_count_field`: ``width``, ``depth``,
  ``units``, ``*_width``, ``*_size``, ``*_samples``, ...; ``trace_probes`` >= 4 for Hutch++, 2 for
  Hutchinson), where the run config gives it as a number: ``--set width=-1`` used to fail in every run,
  ``units=-1`` to slice silently, ``units=0`` to train to the end and fail in the figures;
* the training fields a run config sets (``lr``, ``momentum``, ``steps``, ``batch_size``, ...) make a
  valid :class:`~studies.lab.train.TrainConfig` (:func:`studies.lab.runs.run_train_config`: its own
  ranges and messages), so ``--set lr=-1`` fails before the first run, not in every run;
* the dataset's files are there (:func:`studies.lab.data.check_dataset_available`, the loader's own
  directory resolution and message), without reading them.

A name problem raises ``ValueError``; when every problem is a missing dataset, ``FileNotFoundError``.
Nothing is built but one norm layer per distinct (norm, options) and, for ``in``, one tiny net per arch.
Not checked: options a single study interprets itself (edge_of_stability's ``loss``, hessian_spectrum's
``trace_method``, ...), numeric ranges other than those above, and relations between fields (``units``
above ``width`` records ``width`` units).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from probes.functional import BN_MODES
from studies.lab.data import DATASETS, check_dataset_available, run_data_options
from studies.lab.nets import ACTIVATIONS, ARCHS, INITS, PLACEMENTS, make_net
from studies.lab.norms import NEEDS_POSITIONS, NORMS, make_norm
from studies.lab.runs import TRAIN_FIELDS, run_train_config
from studies.lab.study import Study
from studies.lab.train import OPTIMIZERS, SCHEDULES

__all__ = ["NORM_OPTION_FIELDS", "REQUIRED_FIELDS", "STUDY_EXTRA_NAMES", "validate_runs"]

#: Fields every run config has (DESIGN.md: the record fields).
REQUIRED_FIELDS: tuple[str, ...] = ("arch", "norm", "dataset", "seed")

#: Names that a study's ``run`` accepts besides the registries', by study and run-config field:
#: hessian_spectrum's ``popbn`` (BN with population statistics, which its ``run`` builds as ``bn``), and
#: whitening's least-squares part, which builds no net and generates its own data (arch ``linear``,
#: dataset ``least_squares``).
STUDY_EXTRA_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "hessian_spectrum": {"norm": ("popbn",)},
    "whitening": {"arch": ("linear",), "dataset": ("least_squares",)},
}

_NOISE_FIELDS = ("noise_mean", "noise_scale", "noise_std")

#: Run-config fields that studies pass to a norm's constructor as options, by norm: batch_size and
#: learning_rate pass ``groups`` to ``gn``; landscape ``p`` to ``lp_bn``; noisy_bn its noise options to
#: ``noisy_bn`` and ``noise``; whitening ``group_size`` to ``dbn`` and ``iternorm``, and ``iterations`` to
#: ``iternorm``. A field a run config lacks (or sets to None) is left to the norm's default.
NORM_OPTION_FIELDS: dict[str, tuple[str, ...]] = {
    "gn": ("groups",),
    "lp_bn": ("p",),
    "noisy_bn": _NOISE_FIELDS,
    "noise": _NOISE_FIELDS,
    "dbn": ("group_size",),
    "iternorm": ("group_size", "iterations"),
}


def _lp_p(p: Any) -> Any:
    """``p`` as landscape's ``run`` hands it to ``lp_bn``: the string ``"inf"`` as is, else as an int."""
    if p == "inf":
        return p
    try:
        return int(p)
    except ValueError:
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}") from None


#: How a run-config field becomes the norm option (as the study's ``run`` converts it); others pass as is.
_OPTION_CONVERTERS: dict[str, Callable[[Any], Any]] = {"p": _lp_p}

#: Channels of the norm layer built to check its options: any count works (groups fall back to a divisor).
_CHECK_FEATURES = 16

#: Field → (registry, what a name of it is called in messages).
_REGISTRIES: dict[str, tuple[Iterable[str], str]] = {
    "arch": (ARCHS, "a known architecture"),
    "norm": (NORMS, "a known normalization"),
    "dataset": (DATASETS, "a known dataset"),
    "activation": (ACTIVATIONS, "a known activation"),
    "init": (INITS, "a known initialization"),
    "placement": (PLACEMENTS, "a known placement"),
    "optimizer": (OPTIMIZERS, "a known optimizer"),
    "schedule": (SCHEDULES, "a known learning-rate schedule"),
    "probe_bn": (BN_MODES, "a mode of the probes' norms"),
}


class _Problems:
    """Distinct problems in the order found; each remembers whether it is a missing dataset."""

    def __init__(self) -> None:
        self.items: dict[str, bool] = {}  # message -> is a missing dataset

    def add(self, message: str, *, missing_data: bool = False) -> None:
        self.items.setdefault(message, missing_data)

    def raise_if_any(self, study_name: str) -> None:
        if not self.items:
            return
        messages = list(self.items)
        if len(messages) == 1:
            text = f"study {study_name!r}: {messages[0]}"
        else:
            listed = "\n".join(f"  * {m}" for m in messages)
            text = f"study {study_name!r}: {len(messages)} problems in the planned runs:\n{listed}"
        if all(self.items.values()):
            raise FileNotFoundError(text)
        raise ValueError(text)


def _known_names(study: Study, field: str) -> tuple[str, ...]:
    registry, _ = _REGISTRIES[field]
    return (*registry, *STUDY_EXTRA_NAMES.get(study.name, {}).get(field, ()))


def _check_name(study: Study, rc: Mapping[str, Any], field: str, problems: _Problems) -> bool:
    """Whether ``rc[field]`` names a registered thing (not a study's own extra); adds a problem if unknown."""
    value = rc[field]
    known = _known_names(study, field)
    if not isinstance(value, str) or value not in known:
        what = _REGISTRIES[field][1]
        problems.add(f"{field} {value!r} is not {what}; known: {', '.join(known)}")
        return False
    return value in _REGISTRIES[field][0]


def _norm_options(norm: str, rc: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    fields = NORM_OPTION_FIELDS.get(norm, ())
    return tuple((k, rc[k]) for k in fields if rc.get(k) is not None)


def _check_norm_options(norm: str, options: tuple[tuple[str, Any], ...], problems: _Problems) -> None:
    try:
        kwargs = {k: _OPTION_CONVERTERS.get(k, lambda v: v)(v) for k, v in options}
        make_norm(norm, _CHECK_FEATURES, **kwargs)
    except (ValueError, TypeError) as err:
        given = ", ".join(f"{k}={v!r}" for k, v in options)
        problems.add(f"norm {norm!r} with {given}: {err}")


def _check_positions(arch: str, norm: str, problems: _Problems) -> None:
    """A norm of NEEDS_POSITIONS in ``arch``: build the arch's default net on a 1-D signal, as
    ``norm_zoo.applicable`` does; the builder's ValueError says why it cannot be."""
    try:
        make_net(arch, norm=norm, in_shape=(_CHECK_FEATURES,), num_classes=2)
    except ValueError as err:
        problems.add(str(err))


def _is_count(value: Any, at_least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


#: Run-config fields that are sizes or counts (>= 1), by name or by suffix.
_COUNT_NAMES = ("width", "depth", "units", "epochs", "n_train", "n_test", "trace_probes")
_COUNT_SUFFIXES = ("_width", "_depth", "_size", "_samples", "_runs", "_iter", "_rounds", "_dim", "_seeds")


def _is_count_field(key: str) -> bool:
    return key in _COUNT_NAMES or key.endswith(_COUNT_SUFFIXES)


def _least_count(key: str, rc: Mapping[str, Any]) -> int:
    """The smallest value ``rc[key]`` may take: Hutch++ needs 4 probes, Hutchinson 2 (spectral.trace)."""
    if key == "trace_probes":
        return 4 if rc.get("trace_method", "hutchpp") == "hutchpp" else 2
    return 1


def _first_time(seen: set[str], key: Any) -> bool:
    """Whether ``key`` (by its repr, so unhashable values work) is new to ``seen``; records it."""
    text = repr(key)
    if text in seen:
        return False
    seen.add(text)
    return True


def validate_runs(study: Study, planned: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Check every ``(run_id, run_config)`` of a planned grid (:func:`studies.lab.sweep.plan_runs`)
    before any run starts; see the module docstring for what is checked.

    Raises ``ValueError`` (or ``FileNotFoundError`` when every problem is a missing dataset) whose
    message names the study and lists each distinct problem once, e.g.
    ``study 'norm_zoo': norm 'foo' is not a known normalization; known: none, bn, ln, ...``.
    """
    problems = _Problems()
    checked: set[str] = set()  # reprs of the (norm, options), (arch, norm) and (dataset, options) seen
    for run_id, rc in planned:
        absent = [f for f in REQUIRED_FIELDS if f not in rc]
        if absent:
            problems.add(
                f"run {run_id} has no {', '.join(map(repr, absent))} field "
                f"(every run config has {', '.join(REQUIRED_FIELDS)})"
            )
        registered = {field: _check_name(study, rc, field, problems) for field in _REGISTRIES if field in rc}
        if registered.get("norm"):
            norm = rc["norm"]
            options = _norm_options(norm, rc)
            if options and _first_time(checked, ("options", norm, options)):
                _check_norm_options(norm, options, problems)
            arch = rc["arch"] if registered.get("arch") else None
            if arch and norm in NEEDS_POSITIONS and _first_time(checked, ("positions", arch, norm)):
                _check_positions(arch, norm, problems)
        for key, value in rc.items():
            if key.endswith("_every") and key not in TRAIN_FIELDS and not _is_count(value):
                problems.add(f"{key} must be an int >= 1 (a number of steps), got {value!r}")
            elif (
                _is_count_field(key)
                and key not in TRAIN_FIELDS
                and isinstance(value, int | float | str)
                and not _is_count(value, least := _least_count(key, rc))
            ):
                problems.add(f"{key} must be an int >= {least} (a size or count), got {value!r}")
        train = tuple((k, rc[k]) for k in TRAIN_FIELDS if k in rc)
        named = all(registered.get(f, True) for f in ("optimizer", "schedule"))  # else reported above
        if train and named and _first_time(checked, ("train", train)):
            try:
                run_train_config(rc)
            except (ValueError, TypeError) as err:
                problems.add(str(err))
        if registered.get("dataset"):
            data_options = run_data_options(rc)
            if _first_time(checked, ("data", rc["dataset"], sorted(data_options.items()))):
                try:
                    check_dataset_available(rc["dataset"], **data_options)
                except FileNotFoundError as err:
                    problems.add(f"dataset {rc['dataset']!r}: {err}", missing_data=True)
    problems.raise_if_any(study.name)
