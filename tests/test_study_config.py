"""--set overrides: typed parsing and clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from studies.lab.study import apply_overrides


@dataclass(frozen=True)
class C:
    norms: tuple[str, ...] = ("none", "bn")
    lr: float = 0.1
    steps: int = 10
    flag: bool = False
    data_root: str | None = None
    pair: tuple[int, float] = (1, 2.0)
    seeds: int = 3


def test_overrides_parse_types():
    c = apply_overrides(
        C(), ["norms=bn,ln,gn", "lr=0.5", "steps=7", "flag=true", "data_root=/data", "pair=3,4.5"], seeds=2
    )
    assert c == C(
        norms=("bn", "ln", "gn"), lr=0.5, steps=7, flag=True, data_root="/data", pair=(3, 4.5), seeds=2
    )
    assert apply_overrides(C(data_root="x"), ["data_root=none"]).data_root is None
    assert apply_overrides(C(), ["data.root=/d"]).data_root == "/d"  # dotted keys read as underscores


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("nokey=1", "no such key; keys: data_root, flag, lr, norms"),
        ("lr=fast", "--set lr=fast: expected a value of type float"),
        ("steps=1.5", "expected a value of type int"),
        ("flag=maybe", "expected a value of type bool"),
        ("pair=1", "expected 2 comma-separated values"),
        ("lr", "expects key=value"),
    ],
)
def test_bad_overrides(item, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        apply_overrides(C(), [item])


def test_bad_seeds():
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        apply_overrides(C(), seeds=0)
