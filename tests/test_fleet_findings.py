"""Do the seed papers' findings reappear (:mod:`vlmfast.fleet.findings`)? A store written by hand with values
chosen so that each verdict (reappears, partly, does not reappear, not measured) comes out, checked against the
means, deltas and spreads computed here; and the report page / ``findings.json`` that carry them."""

from __future__ import annotations

import hashlib
import json
import statistics

import pytest

from vlmfast.fleet import AuditStore, write_report
from vlmfast.fleet.findings import PARTLY, REAPPEARS, UNMEASURED, NOT, Comparison, check_findings
from vlmfast.fleet.report import load_fleet

SETTINGS = {a: {"version": 1} for a in ("calibration", "rationality", "spurious")}


def _key(name):
    return hashlib.sha256(name.encode()).hexdigest()


def _model(st, name, method, seed=None, strength=0.0, kind="classifier"):
    st.add_model(_key(name), name, f"runs/{name}", {"kind": kind, "method": method, "seed": seed,
                                                    "meta": {"strength": strength}})
    return _key(name)


def _put(st, key, audit, split, **values):
    st.write(key, audit, f"fp-{split}", SETTINGS[audit], [(split, m, float(v)) for m, v in values.items()],
             split_info={split: {"n": 10}})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    db = tmp_path_factory.mktemp("findings") / "audit.sqlite"
    with AuditStore(db) as st:
        zs = _model(st, "zs", "zero-shot", kind="base")
        _put(st, zs, "rationality", "id", pt=0.60, ir=0.70)
        _put(st, zs, "rationality", "sklearn-digits", pt=0.50, ir=0.40)
        for s, (pt, ir) in enumerate([(0.40, 0.80), (0.42, 0.82)]):  # ft: PT down, IR up, beyond the spread
            k = _model(st, f"ft-{s}", "ft", s)
            _put(st, k, "rationality", "id", pt=pt, ir=ir)
        for s, (pt, ir) in enumerate([(0.50, 0.60), (0.52, 0.62)]):  # flyp: PT down, IR down
            k = _model(st, f"flyp-{s}", "flyp", s)
            _put(st, k, "rationality", "id", pt=pt, ir=ir)
            _put(st, k, "calibration", "id", ece=0.05, accuracy=0.9)
            _put(st, k, "calibration", "noise-3", ece=0.10 + 0.02 * s, accuracy=0.8)
            _put(st, k, "calibration", "sklearn-digits", ece=0.30, accuracy=0.5)
        for s, e in enumerate([0.195, 0.205]):  # carot: OOD mean lower by less than flyp's spread
            k = _model(st, f"carot-{s}", "carot", s)
            _put(st, k, "calibration", "noise-3", ece=e, accuracy=0.8)
            _put(st, k, "calibration", "sklearn-digits", ece=0.20, accuracy=0.5)
        for s, (p10, wg) in enumerate([(1.0, 0.10), (0.9, 0.20)]):  # the shortcut models and their mitigation
            k = _model(st, f"flyp95-{s}", "flyp", s, 0.95)
            _put(st, k, "spurious", "id", found=1, precision_at_10=p10)
            _put(st, k, "calibration", "id", worst_group_accuracy=wg, accuracy=0.7)
            r = _model(st, f"ravl-{s}", "ravl", s, 0.95)
            _put(st, r, "calibration", "id", worst_group_accuracy=wg + 0.4, accuracy=0.7)
        for s in (0, 1):
            for m, e in (("coop", 0.10 + 0.02 * s), ("coop+dor", 0.05 + 0.01 * s), ("kgcoop", 0.03),
                         ("kgcoop+dor", 0.04)):
                k = _model(st, f"{m}-{s}", m, s, kind="prompt")
                _put(st, k, "calibration", "id", new_ece=e, new_accuracy=0.8)
    return db, {f.key: f for f in check_findings(load_fleet(db))}


def _ms(v):
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def test_rationality_partly(fleet):
    _, f = fleet
    r = f["rationality"]
    assert r.verdict == PARTLY  # ft: both yes; flyp: PT yes, IR no
    by = {(c.group, c.metric): c for c in r.comparisons}
    assert set(by) == {("ft", "pt"), ("ft", "ir"), ("flyp", "pt"), ("flyp", "ir")}  # lp has no results
    c = by[("ft", "pt")]
    assert c.ref_values == [0.60] and sorted(c.values) == [0.40, 0.42]
    assert c.delta == pytest.approx(0.41 - 0.60) and c.spread == pytest.approx(_ms([0.40, 0.42])[1])
    assert [by[k].verdict for k in (("ft", "pt"), ("ft", "ir"), ("flyp", "pt"), ("flyp", "ir"))] == \
        ["yes", "yes", "yes", "no"]
    assert "Δ -19.0" in c.text() and c.text().endswith("— yes")


def test_dor_reappears_with_coop_as_the_verdict(fleet):
    _, f = fleet
    d = f["dor"]
    assert d.verdict == REAPPEARS and [c.reference for c in d.comparisons] == ["coop"]
    c = d.comparisons[0]
    assert c.delta == pytest.approx(0.055 - 0.11) and c.spread == pytest.approx(_ms([0.10, 0.12])[1])
    # KgCoOp+DOR is worse here: reported, not part of the verdict
    assert any(n.startswith("kgcoop+dor vs kgcoop") and "— no (not in the verdict)" in n for n in d.notes)


def test_carot_within_spread_does_not_reappear(fleet):
    _, f = fleet
    c = f["carot"]
    assert c.verdict == NOT
    (cmp,) = c.comparisons
    # per model, the mean over its OOD splits (noise-3 and sklearn-digits)
    assert sorted(cmp.ref_values) == pytest.approx([0.20, 0.21]) and sorted(cmp.values) == pytest.approx(
        [0.1975, 0.2025])
    assert cmp.verdict == "within spread" and 0 < -cmp.delta < cmp.spread


def test_ravl_reappears(fleet):
    _, f = fleet
    r = f["ravl"]
    assert r.verdict == REAPPEARS
    bar, wg = r.comparisons
    assert bar.bar and bar.ref_values == [0.5] and sorted(bar.values) == [0.9, 1.0]
    assert "against the bar 50.0" in bar.text()
    assert wg.metric == "worst_group_accuracy" and wg.delta == pytest.approx(0.4)


def test_empty_store_is_not_measured_with_reasons(tmp_path):
    db = tmp_path / "empty.sqlite"
    with AuditStore(db) as st:
        _model(st, "zs", "zero-shot", kind="base")
    found = check_findings(load_fleet(db))
    assert [x.verdict for x in found] == [UNMEASURED] * 4
    assert all(x.reason for x in found)
    assert json.loads(json.dumps([x.as_dict() for x in found]))[0]["verdict"] == UNMEASURED


def test_verdict_rule():
    def cmp(ref, vals, direction="lower"):
        return Comparison("w", "m", direction, "a", "b", ref, vals).verdict

    assert cmp([0.5], [0.4]) == "yes"  # single values: no spread
    assert cmp([0.5, 0.7], [0.5]) == "within spread"  # Δ -0.1 < std 0.141
    assert cmp([0.5], [0.5]) == "no" and cmp([0.5], [0.6]) == "no" and cmp([0.5], [0.6], "higher") == "yes"


def test_report_page_and_json_carry_the_findings(fleet, tmp_path):
    db, f = fleet
    res = write_report(db, tmp_path / "report", formats=("html",), plots=False)
    html = res.index.read_text(encoding="utf-8")
    sec = html[html.index('id="findings"'):html.index('id="summary"')]
    for x in f.values():
        assert x.claim in sec and f">{x.verdict}</span>" in sec
    assert "coop+dor vs coop, id: new_ece coop 11.0 ± 1.4 (n=2) → coop+dor 5.5 ± 0.7 (n=2)" in sec
    data = json.loads((tmp_path / "report" / "findings.json").read_text())
    assert [d["key"] for d in data] == ["rationality", "dor", "carot", "ravl"]
    assert [d["verdict"] for d in data] == [f[k].verdict for k in ("rationality", "dor", "carot", "ravl")]
