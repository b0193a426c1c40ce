"""Do the seed papers' findings reappear in a fleet? Each check reads the store's numbers (a :class:`Fleet`) and
states, with those numbers, whether the paper's claim holds on them.

=============  ==============================================================================================
``rationality`` PT/IR paper: fine-tuning lowers PT and raises IR. Each fine-tuning method of the fleet
                (:data:`FINE_TUNED`: ``lp``, ``ft``, ``flyp`` — trained without the planted feature, strength 0)
                against the zero-shot model, rationality audit on ``id``
``dor``         DOR paper: the outlier regularizer lowers new-class ECE vs CoOp. ``coop+dor`` against
                ``coop`` (and the same for CoCoOp / KgCoOp when the fleet has them), ``new_ece`` of the
                calibration audit (the base-to-new protocol) on ``id``
``carot``       CaRot paper: CaRot lowers OOD ECE vs FLYP. ``carot`` against ``flyp`` (strength 0), the
                calibration ECE averaged over every split but ``id`` per model
``ravl``        RaVL paper: discovery finds the planted feature, mitigation raises worst-group accuracy. (a) the
                spurious audit of the models trained with the planted feature (``flyp``, the strongest strength
                of the fleet): ``found`` and Precision@10 against the red-square regions (the finding holds at
                Precision@10 >= 0.5); (b) ``ravl`` against those ``flyp`` models, ``worst_group_accuracy`` of the
                calibration audit on ``id`` (groups class x square present)
=============  ==============================================================================================

**Verdicts.** A comparison of a group of models (their seeds) with a reference group is ``"yes"`` when the mean
moves the paper's way by more than the seed spread (the larger sample standard deviation of the two groups; 0 when
both are single models), ``"within spread"`` when it moves that way by less, ``"no"`` when it moves the other way
(or not at all). A finding **reappears** when every one of its comparisons is ``"yes"``, **does not reappear**
when none is, **partly** otherwise; **not measured** when the fleet lacks the models or metrics it needs (the
reason is given). Nothing here is tuned: the checks, the groups and the rule are fixed in this module.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vlmfast.fleet.report import Fleet, audit_rows

__all__ = ["Comparison", "FINE_TUNED", "Finding", "check_findings", "findings_markdown"]

#: The fine-tuning methods of the rationality check (the paper's LP / FT / FLCP).
FINE_TUNED = ("lp", "ft", "flyp")
ID_SPLIT = "id"

REAPPEARS, PARTLY, NOT, UNMEASURED = "reappears", "partly", "does not reappear", "not measured"


@dataclass
class Comparison:
    """One comparison: ``metric`` of ``group`` vs ``reference`` (their per-model values), the direction the paper
    reports (``"lower"`` / ``"higher"``) and the verdict (module docs)."""

    what: str
    metric: str
    direction: str
    reference: str
    group: str
    ref_values: list[float]
    values: list[float]
    bar: bool = False  # the reference is a fixed bar (one value), not a group of models

    @staticmethod
    def _ms(v: Sequence[float]) -> tuple[float, float]:
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    @property
    def delta(self) -> float:
        return self._ms(self.values)[0] - self._ms(self.ref_values)[0]

    @property
    def spread(self) -> float:
        return max(self._ms(self.values)[1], self._ms(self.ref_values)[1])

    @property
    def verdict(self) -> str:
        d = self.delta if self.direction == "higher" else -self.delta
        if not d > 0:
            return "no"
        return "yes" if d > self.spread else "within spread"

    def text(self, scale: float = 100.0) -> str:
        def ms(v: Sequence[float]) -> str:
            m, s = self._ms(v)
            return f"{scale * m:.1f}" + (f" ± {scale * s:.1f}" if len(v) > 1 else "") + f" (n={len(v)})"
        if self.bar:
            return (f"{self.what}: {self.metric} {ms(self.values)} against the bar {scale * self.ref_values[0]:.1f} "
                    f"(paper: {self.direction}; spread {scale * self.spread:.1f}) — {self.verdict}")
        return (f"{self.what}: {self.metric} {self.reference} {ms(self.ref_values)} → {self.group} "
                f"{ms(self.values)}, Δ {scale * self.delta:+.1f} (spread {scale * self.spread:.1f}; paper: "
                f"{self.direction}) — {self.verdict}")

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "metric": self.metric, "direction": self.direction, "reference": self.reference,
                "group": self.group, "reference_values": self.ref_values, "values": self.values, "bar": self.bar,
                "delta": self.delta, "spread": self.spread, "verdict": self.verdict}


@dataclass
class Finding:
    """One paper's finding: ``key``, ``paper``, ``claim``, the :class:`Comparison` s, extra ``notes`` (numbers
    that are not part of the verdict), and — when not measured — the ``reason``."""

    key: str
    paper: str
    claim: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def verdict(self) -> str:
        if not self.comparisons:
            return UNMEASURED
        vs = [c.verdict for c in self.comparisons]
        if all(v == "yes" for v in vs):
            return REAPPEARS
        if not any(v == "yes" for v in vs):
            return NOT
        return PARTLY

    def lines(self) -> list[str]:
        out = [c.text() for c in self.comparisons] + list(self.notes)
        if self.reason:
            out.append(f"not measured: {self.reason}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "paper": self.paper, "claim": self.claim, "verdict": self.verdict,
                "comparisons": [c.as_dict() for c in self.comparisons], "notes": list(self.notes),
                "reason": self.reason}


# ------------------------------------------------------------------------------------------------ selecting


def _strength(fleet: Fleet, key: str) -> float | None:
    s = fleet.model(key).meta.get("strength")
    return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else None


def _values(fleet: Fleet, audit: str, metric: str, splits: Callable[[str], bool],
            select: Callable[[str], bool]) -> list[float]:
    """Per current model selected by ``select(model_key)``: ``metric`` averaged over its splits that ``splits``
    accepts (NaN values left out; a model without any value is left out)."""
    _, rows = audit_rows(fleet, audit)
    per: dict[str, list[float]] = {}
    for r in rows:
        info = fleet.model(r["model_key"])
        if not info.current or not splits(r["split"]) or not select(r["model_key"]):
            continue
        v = r["values"].get(metric)
        if v is not None and not math.isnan(v):
            per.setdefault(r["model_key"], []).append(float(v))
    return [statistics.fmean(v) for v in per.values()]


def _method(fleet: Fleet, *methods: str, strength: float | None = None) -> Callable[[str], bool]:
    def pick(key: str) -> bool:
        info = fleet.model(key)
        if info.method not in methods:
            return False
        s = _strength(fleet, key)
        return strength is None or (s if s is not None else 0.0) == strength
    return pick


def _is_id(split: str) -> bool:
    return split == ID_SPLIT


def _is_ood(split: str) -> bool:
    return split != ID_SPLIT


def _compare(fleet: Fleet, finding: Finding, what: str, audit: str, metric: str, direction: str,
             ref: tuple[str, Callable[[str], bool]], group: tuple[str, Callable[[str], bool]],
             splits: Callable[[str], bool]) -> bool:
    a = _values(fleet, audit, metric, splits, ref[1])
    b = _values(fleet, audit, metric, splits, group[1])
    if not a or not b:
        missing = ref[0] if not a else group[0]
        finding.notes.append(f"{what}: no {audit} {metric} for {missing} in the store")
        return False
    finding.comparisons.append(Comparison(what, metric, direction, ref[0], group[0], a, b))
    return True


# ------------------------------------------------------------------------------------------------ the checks


def _zero_shot(fleet: Fleet) -> Callable[[str], bool]:
    return lambda key: fleet.model(key).method == "zero-shot" or fleet.model(key).kind == "base"


def _rationality(fleet: Fleet) -> Finding:
    f = Finding("rationality", "PT/IR (rationality of fine-tuned CLIPs)", "fine-tuning lowers PT and raises IR")
    zs = ("zero-shot", _zero_shot(fleet))
    for m in FINE_TUNED:
        grp = (m, _method(fleet, m, strength=0.0))
        if not _values(fleet, "rationality", "pt", _is_id, grp[1]):
            continue
        _compare(fleet, f, f"{m} vs zero-shot, {ID_SPLIT}", "rationality", "pt", "lower", zs, grp, _is_id)
        _compare(fleet, f, f"{m} vs zero-shot, {ID_SPLIT}", "rationality", "ir", "higher", zs, grp, _is_id)
        ood = _values(fleet, "rationality", "pt", _is_ood, grp[1])
        zo = _values(fleet, "rationality", "pt", _is_ood, zs[1])
        if ood and zo:
            f.notes.append(f"{m} vs zero-shot, OOD splits (not in the verdict): PT {100 * statistics.fmean(zo):.1f} "
                           f"→ {100 * statistics.fmean(ood):.1f}, IR "
                           f"{100 * statistics.fmean(_values(fleet, 'rationality', 'ir', _is_ood, zs[1])):.1f} → "
                           f"{100 * statistics.fmean(_values(fleet, 'rationality', 'ir', _is_ood, grp[1])):.1f}")
    if not f.comparisons:
        f.reason = (f"needs rationality results on {ID_SPLIT!r} for a zero-shot model and one of {FINE_TUNED} "
                    "(strength 0)")
    return f


def _dor(fleet: Fleet) -> Finding:
    f = Finding("dor", "DOR (outlier regularization of prompt tuning)", "DOR lowers new-class ECE vs CoOp")
    for m in ("coop", "cocoop", "kgcoop"):
        ref, grp = (m, _method(fleet, m)), (f"{m}+dor", _method(fleet, f"{m}+dor"))
        if _values(fleet, "calibration", "new_ece", _is_id, ref[1]) and \
                _values(fleet, "calibration", "new_ece", _is_id, grp[1]):
            _compare(fleet, f, f"{m}+dor vs {m}, {ID_SPLIT}", "calibration", "new_ece", "lower", ref, grp, _is_id)
            acc = [statistics.fmean(_values(fleet, "calibration", "new_accuracy", _is_id, g[1])) for g in (ref, grp)]
            f.notes.append(f"{m}+dor vs {m}: new-class accuracy {100 * acc[0]:.1f} → {100 * acc[1]:.1f} "
                           "(not in the verdict)")
    # the claim is about CoOp: the verdict is CoOp's; the other pairs are reported beside it
    main = [c for c in f.comparisons if c.reference == "coop"]
    if main:
        others = [c for c in f.comparisons if c.reference != "coop"]
        f.comparisons = main
        f.notes = [c.text() + " (not in the verdict)" for c in others] + f.notes
    else:
        f.comparisons = []
        f.reason = f"needs calibration new_ece on {ID_SPLIT!r} for coop and coop+dor models (prompt entries)"
    return f


def _carot(fleet: Fleet) -> Finding:
    f = Finding("carot", "CaRot (calibrated robust fine-tuning)", "CaRot lowers OOD ECE vs FLYP")
    ref, grp = ("flyp", _method(fleet, "flyp", strength=0.0)), ("carot", _method(fleet, "carot", strength=0.0))
    if _compare(fleet, f, "carot vs flyp, mean over the OOD splits", "calibration", "ece", "lower", ref, grp,
                _is_ood):
        a, b = (_values(fleet, "calibration", "ece", _is_id, g[1]) for g in (ref, grp))
        if a and b:
            f.notes.append(f"carot vs flyp, {ID_SPLIT} (not in the verdict): ECE {100 * statistics.fmean(a):.1f} → "
                           f"{100 * statistics.fmean(b):.1f}")
    else:
        f.reason = "needs calibration results on an OOD split for flyp and carot models (strength 0)"
    return f


def _ravl(fleet: Fleet) -> Finding:
    f = Finding("ravl", "RaVL (region-aware spurious-correlation discovery and mitigation)",
                "RaVL finds the planted feature and raises worst-group accuracy")
    strengths = sorted({s for k in fleet.models if (s := _strength(fleet, k)) is not None and s > 0})
    if not strengths:
        f.reason = "needs models trained with the planted feature (strength > 0)"
        return f
    s = strengths[-1]
    shortcut = (f"flyp (strength {s:g})", _method(fleet, "flyp", strength=s))
    p10 = _values(fleet, "spurious", "precision_at_10", _is_id, shortcut[1])
    found = _values(fleet, "spurious", "found", _is_id, shortcut[1])
    if p10:
        # (a) as a comparison against the bar the module fixes: Precision@10 of the top cluster >= 0.5
        f.comparisons.append(Comparison(f"discovery on {shortcut[0]}, {ID_SPLIT}", "precision_at_10", "higher",
                                        "the 0.5 bar", shortcut[0], [0.5], p10, bar=True))
        f.notes.append(f"discovery on {shortcut[0]}: a cluster flagged on {sum(v > 0 for v in found)} of "
                       f"{len(found)} models; Precision@10 of the top cluster "
                       + ", ".join(f"{v:.1f}" for v in p10))
        ctrl = _values(fleet, "spurious", "precision_at_10", _is_id, _method(fleet, "flyp", strength=0.0))
        if ctrl:
            f.notes.append("control, flyp trained without the feature (not in the verdict): Precision@10 "
                           + ", ".join(f"{v:.1f}" for v in ctrl))
    else:
        f.notes.append(f"no spurious-audit results on {ID_SPLIT!r} for {shortcut[0]}")
    ravl = ("ravl", _method(fleet, "ravl", strength=s))
    _compare(fleet, f, f"ravl vs {shortcut[0]}, {ID_SPLIT}", "calibration", "worst_group_accuracy", "higher",
             shortcut, ravl, _is_id)
    acc = [_values(fleet, "calibration", "accuracy", _is_id, g[1]) for g in (shortcut, ravl)]
    if all(acc):
        f.notes.append(f"ravl vs {shortcut[0]}: accuracy {100 * statistics.fmean(acc[0]):.1f} → "
                       f"{100 * statistics.fmean(acc[1]):.1f} (not in the verdict)")
    if not f.comparisons:
        f.reason = "needs spurious results and calibration worst_group_accuracy for flyp and ravl models"
    return f


CHECKS = (_rationality, _dor, _carot, _ravl)


def check_findings(fleet: Fleet) -> list[Finding]:
    """The four findings (module docs) on ``fleet``, in the order rationality, dor, carot, ravl."""
    return [check(fleet) for check in CHECKS]


def findings_markdown(findings: Sequence[Finding]) -> str:
    """The findings as markdown: one heading line per finding with its verdict, its evidence as bullets."""
    out = []
    for fd in findings:
        out.append(f"* **{fd.paper}** — *{fd.claim}*: **{fd.verdict}**")
        out += [f"  * {line}" for line in fd.lines()]
    return "\n".join(out)
