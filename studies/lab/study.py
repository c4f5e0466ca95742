"""What a study is: a config with presets, a grid of runs, one run, and the analysis of its records.

Each ``studies/<name>.py`` defines ``STUDY = Study(...)``. The CLI, the sweep and the tests drive every
study through this one protocol, so none of them special-cases a study.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["RunContext", "Study", "apply_overrides", "check_two_probe_points", "parse_value"]


@dataclass(frozen=True)
class RunContext:
    """Where and how one run executes."""

    device: str = "cpu"
    progress: bool = False


@dataclass(frozen=True)
class Study:
    """One experiment: ``grid(config)`` lists the runs' configs, ``run`` executes one, ``analyze`` draws.

    * ``grid(config) -> list[dict]``: one flat, JSON-serializable config per run; each has at least
      ``arch``, ``norm``, ``dataset`` and ``seed`` (the record fields of DESIGN.md).
    * ``run(run_config, ctx) -> list[dict]``: the run's tidy rows (``step, probe, layer, metric, value``).
    * ``analyze(df, config, out_dir) -> list[Claim]``: figures (PDF + PNG) into ``out_dir`` from the
      records of the finished runs, and the claims the study tests, computed from those records.
    * ``config_columns``: config fields (e.g. ``lr``) that ``analyze`` gets as columns of ``df`` next to
      the record fields.
    * ``summarize(df) -> DataFrame`` (optional): the study's own summary table for the paper, from the
      same ``df`` as ``analyze`` (columns ``estimate, ci_low, ci_high, n`` print as ``est [low, high]``;
      see :func:`analysis.tables.dataframe_table`). ``None``: the paper shows the generic summary
      (final accuracy and loss per grid cell) and the claims table only.
    """

    name: str
    title: str
    reproduces: str
    figures: tuple[str, ...]
    presets: Mapping[str, Any]
    grid: Callable[[Any], list[dict[str, Any]]]
    run: Callable[[dict[str, Any], RunContext], list[dict[str, Any]]]
    analyze: Callable[[pd.DataFrame, Any, Path], list[Any]]
    run_id_keys: tuple[str, ...] = ("arch", "norm", "seed")
    config_columns: tuple[str, ...] = ()
    summarize: Callable[[pd.DataFrame], pd.DataFrame] | None = None

    def preset(self, name: str) -> Any:
        try:
            return self.presets[name]
        except KeyError:
            raise KeyError(
                f"study {self.name!r} has no preset {name!r}; presets: {', '.join(self.presets)}"
            ) from None


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse ``text`` as the type ``tp`` of config field ``key`` (``--set key=value``)."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    tp = _strip_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is tuple:
            args = typing.get_args(tp)
            item = args[0] if args else str
            parts = [p.strip() for p in text.split(",") if p.strip()]
            if (len(args) == 2 and args[1] is Ellipsis) or not args:
                return tuple(parse_value(key, p, item) for p in parts)
            if len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(parse_value(key, p, a) for p, a in zip(parts, args, strict=True))
    except ValueError as err:
        name = getattr(tp, "__name__", str(tp))
        raise ValueError(f"--set {key}={text}: expected a value of type {name} ({err})") from None
    raise TypeError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def apply_overrides(config: Any, sets: Sequence[str] = (), *, seeds: int | None = None) -> Any:
    """A copy of the dataclass ``config`` with ``key=value`` overrides (``.`` in keys reads as ``_``)."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace(".", "_").replace("-", "_")
        if key not in fields:
            raise ValueError(
                f"--set {key}: {type(config).__name__} has no such key; keys: {', '.join(sorted(fields))}"
            )
        changes[key] = parse_value(key, text.strip(), hints[key])
    if seeds is not None:
        if "seeds" not in fields:
            raise ValueError(f"{type(config).__name__} has no 'seeds' field")
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        changes["seeds"] = seeds
    return dataclasses.replace(config, **changes)


def check_two_probe_points(study: str, steps: Any, probe_every: Any, why: str) -> None:
    """``ValueError`` unless a run of ``steps`` updates probed every ``probe_every`` reaches a second
    probe point, which a study whose figures compare probe points needs (``why`` says what for)."""
    if not isinstance(steps, int) or not isinstance(probe_every, int) or steps < probe_every:
        raise ValueError(
            f"{study}: steps must be >= probe_every ({why}), got steps={steps!r}, probe_every={probe_every!r}"
        )
