"""Statistics of `timelit report`: runs that differ only in seed form a group; mean ± std per group, paired
differences against a reference group with 95 % confidence intervals.

    timelit report runs/science --out report/science --reference "ema/ema · interpolation"

Why paired. Two protocols run with the same seeds share the seed's data order, evaluation subsets and initial
noise, so the seed-to-seed spread that both share cancels in the per-seed difference d_s = x_group(s) - x_ref(s).
The interval is the Student-t one for the mean of those differences (the paired t-test's interval): mean(d) ±
t_{0.975, n-1} · sd(d) / sqrt(n), with the sample standard deviation (ddof = 1). With n = 1 there is no spread to
estimate: std and interval are shown as "–".

Which runs count. A group's figures are its finished runs' final points; a group with no finished run uses its
unfinished runs' last points and is starred, as the protocol grid does, so a half-finished sweep can still be read
but is not mistaken for a finished one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from timelit.utilities.errors import UserError

if TYPE_CHECKING:
    from timelit.study.runs import RunResult

STAT_KEYS = ("A_KA", "A_ZS", "GM")
FORGETTING_KEYS = ("bwt", "avg_forgetting", "first_half_drop")
DASH = "–"
# The fields of RunResult that define an experiment: runs equal in all of them differ only in seed.
GROUP_FIELDS = ("init", "deploy", "technique", "model", "budget_gflops", "num_tasks", "stream", "mixture")

# t_{0.975, df} for df = 1..30 (two-sided 95 %). scipy is not a dependency and the inverse of the t distribution has
# no closed form; these are the standard table values (checked against numerical integration of the density to 4
# decimals). Above 30 degrees of freedom the Cornish-Fisher expansion in 1/df around the normal quantile
# (Abramowitz & Stegun 26.7.5) is already exact to 4 decimals, so no table is needed there.
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the half-width factor of a 95 % interval)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 values), got df={df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z, v = Z_975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


@dataclass(frozen=True)
class Estimate:
    """Mean, sample std (ddof = 1; NaN for n < 2), n, and the 95 % t interval of the mean (NaN for n < 2)."""

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float

    def cell(self) -> str:
        """'mean ± std' for a table; '–' for what one value cannot give."""
        if self.n == 0:
            return DASH
        return f"{self.mean:.2f} ± {DASH if math.isnan(self.std) else f'{self.std:.2f}'}"

    def ci_cell(self) -> str:
        if self.n == 0:
            return DASH
        interval = DASH if math.isnan(self.ci_low) else f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}]"
        return f"{self.mean:+.2f} {interval}"


def estimate(values: Sequence[float]) -> Estimate:
    """Mean ± std and the 95 % t interval of the mean of `values`; NaNs are left out."""
    xs = [float(v) for v in values if not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Estimate(mean, math.nan, 1, math.nan, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half)


# ---------------------------------------------------------------------------------------------------- groups


def _value(run: RunResult, key: str) -> float:
    if key in STAT_KEYS:
        return run.final(key)
    return getattr(run.forgetting, key) if run.forgetting is not None else math.nan


@dataclass
class RunGroup:
    """Runs equal in every GROUP_FIELDS value; `label` names what sets the group apart from the others."""

    key: tuple[Any, ...]
    runs: list[RunResult]
    label: str = ""

    @property
    def counted(self) -> list[RunResult]:
        """The runs the statistics use: the finished ones, or all when none finished (see the module docstring)."""
        return [r for r in self.runs if r.complete and r.tasks] or [r for r in self.runs if r.tasks]

    @property
    def starred(self) -> bool:
        return any(not r.complete for r in self.counted)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.counted]

    @property
    def is_best_in_time(self) -> bool:
        """init ema, deploy ema, interpolation on a stream: the TIME paper's recommendation (arXiv 2412.06712).
        A one-task run (the multitask bound) is no stream protocol, whatever its protocol fields say."""
        first = self.runs[0]
        protocol = (first.init, first.deploy, first.technique.split("(")[0])
        return protocol == ("ema", "ema", "interpolation") and first.num_tasks != 1

    def estimate(self, key: str) -> Estimate:
        return estimate([_value(r, key) for r in self.counted])

    def by_seed(self, key: str) -> dict[int, float]:
        """Per seed, the group's value (the mean should a seed appear twice); runs without a seed are left out."""
        values: dict[int, list[float]] = {}
        for run in self.counted:
            if run.seed is not None and not math.isnan(_value(run, key)):
                values.setdefault(run.seed, []).append(_value(run, key))
        return {seed: sum(vs) / len(vs) for seed, vs in values.items()}


def _field_text(name: str, value: Any) -> str:
    if name == "budget_gflops":
        return "no budget" if value is None else f"{value:.3g} GFLOPs"
    if name == "num_tasks":
        return f"{value} tasks"
    return str(value)


def group_runs(runs: Sequence[RunResult]) -> list[RunGroup]:
    """Runs grouped by every field but the seed, in order of first appearance, each labelled by its protocol
    (`init/deploy · technique`) and the other fields that vary between the groups."""
    groups: dict[tuple[Any, ...], RunGroup] = {}
    for run in runs:
        key = tuple(getattr(run, name) for name in GROUP_FIELDS)
        groups.setdefault(key, RunGroup(key, [])).runs.append(run)
    varying = [i for i, name in enumerate(GROUP_FIELDS[3:], start=3) if len({g.key[i] for g in groups.values()}) > 1]
    for group in groups.values():
        first = group.runs[0]
        parts = [first.protocol, first.technique] + [_field_text(GROUP_FIELDS[i], group.key[i]) for i in varying]
        group.label = " · ".join(parts)
    return list(groups.values())


def reference_group(groups: Sequence[RunGroup], reference: str | None) -> RunGroup:
    """The group named by `reference` (a group label, or the start of exactly one); by default Best-in-TIME if
    present, else the first group."""
    if not groups:
        raise ValueError("timelit report: no runs to group")
    if reference is None:
        return next((g for g in groups if g.is_best_in_time), groups[0])
    exact = [g for g in groups if g.label == reference]
    matches = exact or [g for g in groups if g.label.startswith(reference)]
    if len(matches) == 1:
        return matches[0]
    labels = ", ".join(repr(g.label) for g in groups)
    problem = "matches several groups" if matches else "matches no group"
    raise UserError(f"--reference {reference!r} {problem}; the groups are: {labels}")


def paired_difference(group: RunGroup, reference: RunGroup, key: str) -> Estimate:
    """Mean and 95 % t interval of group - reference in `key` over the seeds both have."""
    ours, theirs = group.by_seed(key), reference.by_seed(key)
    return estimate([ours[seed] - theirs[seed] for seed in sorted(set(ours) & set(theirs))])


# ---------------------------------------------------------------------------------------------------- tables


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def group_table(groups: Sequence[RunGroup]) -> str:
    """Markdown: per group, n, seeds and mean ± std of the final A_KA / A_ZS / GM and the forgetting numbers."""
    head = ["group", "n", "seeds", *(f"final {k}" for k in STAT_KEYS), "BWT", "avg forgetting", "first-half drop"]
    lines = [_row(head), "|---|---:|---|" + "---:|" * (len(head) - 3)]
    for group in groups:
        seeds = ",".join("?" if s is None else str(s) for s in sorted(group.seeds, key=lambda s: (s is None, s or 0)))
        n = f"{len(group.counted)}{'*' if group.starred else ''}"
        cells = [group.label, n, seeds or DASH, *(group.estimate(k).cell() for k in STAT_KEYS + FORGETTING_KEYS)]
        lines.append(_row(cells))
    return "\n".join(lines)


def paired_table(groups: Sequence[RunGroup], reference: RunGroup) -> str:
    """Markdown: per group, its difference from the reference over shared seeds, mean [95 % CI], and n."""
    head = ["group", "n (shared seeds)", *(f"Δ final {k} [95% CI]" for k in ("GM", "A_KA", "A_ZS"))]
    lines = [_row(head), "|---|---:|" + "---:|" * 3]
    for group in groups:
        if group is reference:
            continue
        diffs = [paired_difference(group, reference, k) for k in ("GM", "A_KA", "A_ZS")]
        lines.append(_row([group.label, str(diffs[0].n), *(d.ci_cell() for d in diffs)]))
    return "\n".join(lines)


def statistics_rows(groups: Sequence[RunGroup], reference: RunGroup) -> list[dict[str, Any]]:
    """One dict per group for groups.csv: n, mean and std of each figure, and the paired difference from the
    reference with its interval (NaN where undefined)."""
    rows = []
    for group in groups:
        row: dict[str, Any] = {
            "group": group.label,
            "n": len(group.counted),
            "complete": not group.starred,
            "seeds": " ".join(str(s) for s in group.seeds),
            "reference": group is reference,
        }
        for key in STAT_KEYS + FORGETTING_KEYS:
            e = group.estimate(key)
            row[f"{key}_mean"], row[f"{key}_std"] = e.mean, e.std
        for key in STAT_KEYS:
            d = paired_difference(group, reference, key) if group is not reference else estimate([])
            row[f"diff_{key}_mean"], row[f"diff_{key}_ci_low"], row[f"diff_{key}_ci_high"] = d.mean, d.ci_low, d.ci_high
            row[f"diff_{key}_n"] = d.n
        rows.append(row)
    return rows
