"""LaTeX from results: escaped text, numbers with CIs, booktabs tables of claims and summaries, macros.

Every number the paper prints comes from here, formatted one way:

* :func:`format_number` — a fixed number of decimals chosen from the magnitude (3 significant digits
  at and above 1, 2 below), a typographic minus, ``--`` for NaN;
* :func:`format_ci` — ``0.26 [0.24, 0.27]``: estimate and 95% CI with the decimals of the largest of
  the three, so the three line up;
* :func:`latex_escape` — text to LaTeX: the ten special characters escaped and the Unicode the claims
  use (β, λ, ℓ, ≥, ×, —, ‖, ∞ …) turned into LaTeX commands, so any TeX engine typesets it.

Tables are booktabs ``longtable``s (they break across pages); numbers quoted in prose are macros
``\\wb{<key>}`` defined by ``\\WBset{<key>}{<value>}`` lines (``paper/whybn.sty``).
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "MINUS",
    "CiteIndex",
    "claims_table",
    "config_number",
    "dataframe_table",
    "format_ci",
    "format_number",
    "latex_escape",
    "macro_lines",
    "parse_number",
    "verdict",
]

#: The minus sign in generated LaTeX (a hyphen would print as one).
MINUS = r"\textminus{}"
_SUPERSCRIPTS, _SUPERSCRIPTED = "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁼ⁿⁱᵀ", "0123456789+=niT"
_SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉₊₌"

_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}

#: Unicode → LaTeX for the characters claims, titles and statistics use (math in ``\ensuremath``).
UNICODE_TO_LATEX: dict[str, str] = {
    "α": r"\ensuremath{\alpha}",
    "β": r"\ensuremath{\beta}",
    "γ": r"\ensuremath{\gamma}",
    "δ": r"\ensuremath{\delta}",
    "ε": r"\ensuremath{\varepsilon}",
    "η": r"\ensuremath{\eta}",
    "θ": r"\ensuremath{\theta}",
    "κ": r"\ensuremath{\kappa}",
    "λ": r"\ensuremath{\lambda}",
    "μ": r"\ensuremath{\mu}",
    "ρ": r"\ensuremath{\rho}",
    "σ": r"\ensuremath{\sigma}",
    "τ": r"\ensuremath{\tau}",
    "φ": r"\ensuremath{\varphi}",
    "π": r"\ensuremath{\pi}",
    "ψ": r"\ensuremath{\psi}",
    "ω": r"\ensuremath{\omega}",
    "∠": r"\ensuremath{\angle}",
    "⟂": r"\ensuremath{\perp}",
    "⊥": r"\ensuremath{\perp}",
    "∘": r"\ensuremath{\circ}",
    "∑": r"\ensuremath{\sum}",
    "ₜ": r"\textsubscript{t}",
    "Λ": r"\ensuremath{\Lambda}",
    "Ω": r"\ensuremath{\Omega}",
    "∪": r"\ensuremath{\cup}",
    "⟨": r"\ensuremath{\langle}",
    "⟩": r"\ensuremath{\rangle}",
    "⌊": r"\ensuremath{\lfloor}",
    "⌋": r"\ensuremath{\rfloor}",
    "←": r"\ensuremath{\leftarrow}",
    "ᵢ": r"\textsubscript{i}",
    "⁴": r"\textsuperscript{4}",
    "⁵": r"\textsuperscript{5}",
    "½": r"\ensuremath{\tfrac12}",
    "¼": r"\ensuremath{\tfrac14}",
    "¾": r"\ensuremath{\tfrac34}",
    "ü": r"\"u",
    "Δ": r"\ensuremath{\Delta}",
    "Σ": r"\ensuremath{\Sigma}",
    "ℓ": r"\ensuremath{\ell}",
    "∞": r"\ensuremath{\infty}",
    "∇": r"\ensuremath{\nabla}",
    "≥": r"\ensuremath{\geq}",
    "≤": r"\ensuremath{\leq}",
    "≈": r"\ensuremath{\approx}",
    "≠": r"\ensuremath{\neq}",
    "±": r"\ensuremath{\pm}",
    "×": r"\ensuremath{\times}",
    "·": r"\ensuremath{\cdot}",
    "→": r"\ensuremath{\to}",
    "‖": r"\ensuremath{\|}",
    "√": r"\ensuremath{\surd}",
    "∈": r"\ensuremath{\in}",
    "−": MINUS,
    "—": "---",
    "–": "--",
    "’": "'",
    "‘": "`",
    "“": "``",
    "”": "''",
    "…": r"\ldots{}",
    "§": r"\S{}",
    "′": r"\ensuremath{'}",
    "″": r"\ensuremath{''}",
    **{up: rf"\textsuperscript{{{plain}}}" for up, plain in zip(_SUPERSCRIPTS, _SUPERSCRIPTED, strict=True)},
    "⁻": r"\textsuperscript{\textminus{}}",
    **{sub: rf"\textsubscript{{{plain}}}" for sub, plain in zip(_SUBSCRIPTS, "0123456789+=", strict=True)},
    "₋": r"\textsubscript{\textminus{}}",
    "µ": r"\ensuremath{\mu}",
    "\u00a0": "~",
}


def latex_escape(text: Any) -> str:
    """``text`` as LaTeX that typesets it literally (specials escaped, Unicode as commands).

    A character with no entry in :data:`UNICODE_TO_LATEX` falls back to its ASCII base letter
    (``é`` → ``e``) and, failing that, to ``?`` with a warning naming it, so a build never stops on it.
    """
    out = []
    for ch in str(text):
        if ch in _SPECIALS:
            out.append(_SPECIALS[ch])
        elif ord(ch) < 128:
            out.append(ch)
        elif ch in UNICODE_TO_LATEX:
            out.append(UNICODE_TO_LATEX[ch])
        else:
            base = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
            if not base:
                warnings.warn(f"no LaTeX for {ch!r} (U+{ord(ch):04X}); printed as '?'", stacklevel=2)
            out.append(latex_escape(base) if base else "?")
    return re.sub(r"(?<![\w)\]-])-(?=\.?\d)", lambda _: MINUS, "".join(out))


# ----------------------------------------------------------------------------------------------------
# numbers


def _decimals(magnitude: float) -> int:
    """Decimals that show 3 significant digits at and above 1 and 2 below (``0.26``, ``1.26``, ``12.6``)."""
    if not math.isfinite(magnitude) or magnitude == 0:
        return 2
    order = math.floor(math.log10(magnitude))
    return max(0, 2 - order) if order >= 0 else 1 - order


def _scientific(x: float) -> bool:
    return x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3)


def _format_scientific(x: float, digits: int = 2) -> str:
    """``x`` as ``m.m\\times10^{e}`` with ``digits`` significant digits in the mantissa."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    sign = MINUS if mantissa.startswith("-") else ""
    return rf"{sign}\ensuremath{{{mantissa.lstrip('-')}\times10^{{{int(exponent)}}}}}"


def format_number(x: float | None, decimals: int | None = None) -> str:
    """One number as LaTeX text: ``0.26``, ``\\textminus{}1.41``, ``1.2e-04`` as ``1.2\\times10^{-4}``.

    ``decimals=None`` picks them from the magnitude (:func:`_decimals`); NaN and None print ``--``,
    infinities ``\\ensuremath{\\infty}``.
    """
    if x is None:
        return "--"
    x = float(x)  # numpy and torch scalars too (a float32 nan is not a Python float)
    if math.isnan(x):
        return "--"
    if math.isinf(x):
        return ("" if x > 0 else MINUS) + r"\ensuremath{\infty}"
    if decimals is None and _scientific(x):
        return _format_scientific(x)
    text = f"{x:.{_decimals(abs(x)) if decimals is None else decimals}f}"
    if float(text) == 0:  # no "-0.00"
        text = text.lstrip("-")
    return text.replace("-", MINUS)


#: Values closer than this fraction of the largest magnitude may print alike (four significant digits).
_RESOLUTION = 1e-4


def _tells_apart(values: Sequence[float | None], parts: Sequence[str]) -> bool:
    """Whether ``parts`` show what ``values`` are: values that differ by more than :data:`_RESOLUTION`
    of the largest print differently, and a negative value keeps its minus (a lower bound of −0.001
    printed ``0.00`` would seem to clear a threshold of 0)."""
    shown = [(v, t) for v, t in zip(values, parts, strict=True) if v is not None and math.isfinite(v)]
    if any(v < 0 and MINUS not in t for v, t in shown):
        return False
    alike = _RESOLUTION * max(abs(v) for v, _ in shown)
    return all(abs(a - b) <= alike or ta != tb for i, (a, ta) in enumerate(shown) for b, tb in shown[i + 1 :])


def format_ci(estimate: float, ci_low: float, ci_high: float) -> str:
    """``estimate [ci_low, ci_high]`` with shared decimals, e.g. ``0.26 [0.24, 0.27]``.

    The decimals follow the largest magnitude (:func:`_decimals`), and grow until the estimate and the
    bounds that differ (by more than 1e-4 of the largest) print differently and every negative one keeps
    its minus: ``0.200 [0.199, 0.202]`` for 0.1995 [0.1985, 0.2017], not ``0.20 [0.20, 0.20]``.
    Magnitudes below 1e-3 or from 1e5 up, or a difference that fixed decimals cannot show, are written
    in scientific notation, with as many digits as that needs.
    """
    values = (estimate, ci_low, ci_high)
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "--"
    largest = max(finite)
    parts: list[str] = []
    if not _scientific(largest):
        for decimals in range(min(_decimals(largest), 6), 9):
            parts = [format_number(v, decimals) for v in values]
            if _tells_apart(values, parts):
                return f"{parts[0]} [{parts[1]}, {parts[2]}]"
    for digits in range(2, 9):
        parts = [
            _format_scientific(v, digits) if v is not None and math.isfinite(v) else format_number(v)
            for v in values
        ]
        if _tells_apart(values, parts):
            break
    return f"{parts[0]} [{parts[1]}, {parts[2]}]"


_NUMBER = re.compile(r"(\\textminus\{\})?(\d+(?:\.\d+)?)(?:\\times10\^\{(-?\d+)\})?")


def parse_number(text: str) -> list[float]:
    """The numbers in generated LaTeX text, in order (the inverse of :func:`format_number`; for tests)."""
    values = []
    for sign, digits, exponent in _NUMBER.findall(text.replace(r"\ensuremath{", "")):
        value = float(digits) * (10 ** int(exponent) if exponent else 1)
        values.append(-value if sign else value)
    return values


def verdict(holds: bool | None) -> str:
    """``\\WBholds`` / ``\\WBfails`` (coloured words defined in ``paper/whybn.sty``)."""
    if holds is None:
        return "--"
    return r"\WBholds" if holds else r"\WBfails"


# ----------------------------------------------------------------------------------------------------
# citations


class CiteIndex:
    """Turns "Ioffe & Szegedy 2015, Fig. 1" into ``\\citet{ioffe2015batch}, Fig.~1`` using ``refs.bib``.

    Entries are indexed by (first author's surname, year). Text that names no known entry is escaped
    and left as it is, so an unknown source never breaks the build.
    """

    _ENTRY = re.compile(r"@\w+\s*\{\s*([^,\s]+)\s*,(.*?)(?=\n@|\Z)", re.S)
    _FIELD = re.compile(r"\b(author|year)\s*=\s*[{\"](.+?)[}\"]\s*,?\s*$", re.M | re.I)
    _MENTION = re.compile(
        r"([A-Z][A-Za-z\-']+)((?:,\s*[A-Z][A-Za-z\-']+)*(?:\s*(?:&|and)\s*[A-Z][A-Za-z\-']+)?"
        r"|\s+et\s+al\.)?,?\s+\(?((?:19|20)\d{2})\)?"
    )

    def __init__(self, entries: Mapping[tuple[str, str], str] | None = None) -> None:
        self.entries = dict(entries or {})

    @classmethod
    def from_bib(cls, path: Path | str | None) -> CiteIndex:
        if path is None or not Path(path).is_file():
            return cls()
        entries = {}
        for key, body in cls._ENTRY.findall(Path(path).read_text(encoding="utf-8")):
            fields = {name.lower(): value for name, value in cls._FIELD.findall(body)}
            if "author" not in fields or "year" not in fields:
                continue
            first = fields["author"].split(" and ")[0].strip()
            surname = first.split(",")[0] if "," in first else first.split()[-1]
            surname = re.sub(r"[{}\\'\"`^~]", "", surname).strip().lower().split()[-1]  # "van Laarhoven"
            entries.setdefault((surname, fields["year"].strip()[:4]), key)
        return cls(entries)

    def key(self, surname: str, year: str) -> str | None:
        return self.entries.get((surname.lower(), year))

    @property
    def keys(self) -> set[str]:
        return set(self.entries.values())

    def cite(self, text: str) -> str:
        """``text`` as LaTeX with every "Author[s] YEAR" of a known entry replaced by ``\\citet``."""
        out, last = [], 0
        for m in self._MENTION.finditer(text):
            key = self.key(m.group(1), m.group(3))
            if key is None:
                continue
            out.append(latex_escape(text[last : m.start()]))
            out.append(rf"\citet{{{key}}}")
            last = m.end()
        out.append(latex_escape(text[last:]))
        return re.sub(r"\b(Figs?|Defs?|Eqs?|Tabs?|Thm|Sec)\. (?=\d)", r"\1.~", "".join(out))


# ----------------------------------------------------------------------------------------------------
# tables


def _longtable(
    columns: str, header: Sequence[str], rows: Iterable[Sequence[str]], caption: str, label: str
) -> str:
    head = " & ".join(header) + r" \\"
    lines = [
        r"\begingroup\small\setlength{\tabcolsep}{4pt}",
        rf"\begin{{longtable}}{{{columns}}}",
        rf"\caption{{{caption}}}\label{{{label}}}\\",
        r"\toprule",
        head,
        r"\midrule",
        r"\endfirsthead",
        r"\toprule",
        head,
        r"\midrule",
        r"\endhead",
        r"\bottomrule",
        r"\endlastfoot",
    ]
    body = [" & ".join(row) + r" \\" for row in rows]
    if not body:
        body = [rf"\multicolumn{{{len(header)}}}{{l}}{{\emph{{no rows}}}} \\"]
    return "\n".join([*lines, *body, r"\end{longtable}", r"\endgroup", ""])


def claims_table(
    claims: Sequence[Mapping[str, Any]],
    *,
    caption: str,
    label: str,
    cites: CiteIndex | None = None,
    study: str | None = None,
) -> str:
    """A booktabs longtable of claims.json rows: claim (with source, statistic and criterion), estimate
    [95% CI], n, verdict. With ``study``, a first column names the study (the scoreboard)."""
    cites = cites or CiteIndex()
    rows = []
    for i, c in enumerate(claims, start=1):
        detail = latex_escape(c.get("statistic", ""))
        if c.get("criterion"):
            detail += "; holds if " + latex_escape(c["criterion"])
        claim = rf"{latex_escape(c.get('claim', ''))}\newline{{\footnotesize\itshape {detail}}}"
        source = cites.cite(c.get("source", ""))
        number = format_ci(c.get("estimate"), c.get("ci_low"), c.get("ci_high"))
        row = [str(i), claim, source, number, str(c.get("n", "--")), verdict(c.get("holds"))]
        rows.append(row)
    columns = r"@{}r>{\raggedright}p{0.35\linewidth}>{\raggedright\arraybackslash}p{0.17\linewidth}lrl@{}"
    header = ["", "claim", "source", "estimate [95\\% CI]", "$n$", ""]
    return _longtable(columns, header, rows, caption, label)


def scoreboard_table(
    claims: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    caption: str,
    label: str = "tab:scoreboard",
    cites: CiteIndex | None = None,
) -> str:
    """Every claim of every study in one longtable: study and paper, claim, estimate [CI], n, holds."""
    cites = cites or CiteIndex()
    rows = []
    for name, study_claims in claims.items():
        for i, c in enumerate(study_claims, start=1):
            study = rf"\hyperref[sec:{name}]{{\texttt{{{latex_escape(name)}}}}}~{i}"
            paper = cites.cite(c.get("source", ""))
            rows.append(
                [
                    rf"{study}\newline{{\footnotesize {paper}}}",
                    latex_escape(c.get("claim", "")),
                    format_ci(c.get("estimate"), c.get("ci_low"), c.get("ci_high")),
                    str(c.get("n", "--")),
                    verdict(c.get("holds")),
                ]
            )
    columns = r"@{}>{\raggedright}p{0.22\linewidth}>{\raggedright\arraybackslash}p{0.34\linewidth}lrl@{}"
    header = ["study, paper", "claim", "estimate [95\\% CI]", "$n$", ""]
    return _longtable(columns, header, rows, caption, label)


_CI_COLUMNS = ("estimate", "ci_low", "ci_high")


def config_number(value: Any) -> str:
    """A config value as typed (``0.05``, ``0.00316``, ``200``), with ``1e-06`` as ``10^{−6}`` rather than a
    hyphen: a coordinate of the grid, not an estimate to round."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if "e" not in text:
        return text.replace("-", MINUS)
    mantissa, exponent = text.split("e")
    power = rf"10^{{{int(exponent)}}}"
    return rf"\ensuremath{{{power}}}" if mantissa == "1" else rf"\ensuremath{{{mantissa}\times{power}}}"


def dataframe_table(df: pd.DataFrame, *, caption: str, label: str, exact: Sequence[str] = ()) -> str:
    """A booktabs longtable of a summary DataFrame.

    Columns ``estimate, ci_low, ci_high`` merge into one ``estimate [95% CI]`` column (as do
    ``<x>, <x>_ci_low, <x>_ci_high`` triples, headed ``<x>``); ``n`` and other columns print as they are
    (floats with :func:`format_number`, text escaped). Numbers in the ``exact`` columns (the grid's
    coordinates, e.g. a learning rate of 0.00316) print as typed (:func:`config_number`), not rounded
    to two significant digits like an estimate.
    """
    df = df.reset_index(drop=True)
    groups: list[tuple[str, list[str]]] = []  # (header, source columns)
    used: set[str] = set()
    for col in df.columns:
        if col in used:
            continue
        col = str(col)
        if col == "estimate" and {"ci_low", "ci_high"} <= set(df.columns):
            groups.append(("estimate [95\\% CI]", list(_CI_COLUMNS)))
            used.update(_CI_COLUMNS)
        elif {f"{col}_ci_low", f"{col}_ci_high"} <= set(df.columns):
            groups.append((latex_escape(col) + " [95\\% CI]", [col, f"{col}_ci_low", f"{col}_ci_high"]))
            used.update([col, f"{col}_ci_low", f"{col}_ci_high"])
        else:
            groups.append(("$n$" if col == "n" else latex_escape(col), [col]))
            used.add(col)

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return verdict(value)
        if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
            return format_number(float(value), 0)
        if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"):
            return format_number(float(value))
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "--"
        return latex_escape(value)

    rows = []
    for _, record in df.astype(object).iterrows():  # iterrows would turn an all-numeric row into floats
        row = []
        for _, cols in groups:
            value = record[cols[0]]
            if len(cols) == 3:
                row.append(format_ci(*(float(record[c]) for c in cols)))
            elif cols[0] in exact and isinstance(value, int | float) and not isinstance(value, bool):
                row.append(config_number(value))
            else:
                row.append(cell(value))
        rows.append(row)
    aligns = "".join("r" if all(_is_number(df[c]) for c in cols) else "l" for _, cols in groups)
    return _longtable(f"@{{}}{aligns}@{{}}", [h for h, _ in groups], rows, caption, label)


def _is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


# ----------------------------------------------------------------------------------------------------
# macros

_KEY = re.compile(r"^[A-Za-z0-9_/.\-]+$")


def macro_lines(values: Mapping[str, str]) -> str:
    """``\\WBset{key}{value}`` lines: the numbers prose quotes as ``\\wb{key}`` (values already LaTeX)."""
    lines = []
    for key, value in values.items():
        if not _KEY.match(key):
            raise ValueError(f"macro key {key!r}: use letters, digits and _ / . - only")
        lines.append(rf"\WBset{{{key}}}{{{value}}}")
    return "\n".join(lines) + "\n"


def claim_macros(prefix: str, claims: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Macros of a study's claims: ``<prefix>/claim<i>/{estimate,ci,value,n,holds}``, counts."""
    values: dict[str, str] = {f"{prefix}/claims": str(len(claims))}
    values[f"{prefix}/holds"] = str(sum(bool(c.get("holds")) for c in claims))
    for i, c in enumerate(claims, start=1):
        est, lo, hi = c.get("estimate"), c.get("ci_low"), c.get("ci_high")
        full = format_ci(est, lo, hi)
        values[f"{prefix}/claim{i}/value"] = full
        values[f"{prefix}/claim{i}/estimate"] = full.split(" [")[0]
        values[f"{prefix}/claim{i}/ci"] = "[" + full.split(" [", 1)[1] if " [" in full else "--"
        values[f"{prefix}/claim{i}/n"] = str(c.get("n", "--"))
        values[f"{prefix}/claim{i}/holds"] = "holds" if c.get("holds") else "does not hold"
    return values
