"""The fleet report (``vlmfast report``, :mod:`vlmfast.fleet.report`).

A synthetic store written with :meth:`AuditStore.write` (three methods, several seeds, a retrained model whose old
key is superseded, a key without a ``models`` row, NaN values, failures) checked against numbers computed here by
hand; one real :func:`audit_fleet` run of a random-init ``vlmfast-tiny-rn`` on a 20-image split.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
import shutil
import sqlite3
import struct
import subprocess
import sys

import pytest

from vlmfast.fleet import AuditStore
from vlmfast.fleet.report import (KEY_METRICS, build_report, fmt, load_fleet, summarize, write_report)
from vlmfast.fleet.store import SCHEMA_VERSION

#: method -> seeds (None: no seed)
METHODS = {"zero-shot": [None], "flyp": [1, 2, 3], "coop": [1, 2]}
SPLITS = {"calibration": ("id", "sklearn-digits"), "rationality": ("id",), "spurious": ("id",)}
METRICS = {
    "calibration": ("accuracy", "confidence", "ece", "ace", "mce", "nll", "brier", "n"),
    "rationality": ("accuracy", "pt", "ir", "mean_rma_correct", "RR", "RW", "WR", "WW", "n"),
    "spurious": ("k", "silhouette", "found", "top_gap", "precision_at_10"),
}
SETTINGS = {"calibration": {"n_bins": 15, "version": 1}, "rationality": {"threshold": 0.5, "version": 1},
            "spurious": {"seed": 0, "version": 1}}
ORPHAN = "f" * 64  # results without a models row


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _name(method, seed):
    return method if seed is None else f"{method}-s{seed}"


def _value(rng, audit, metric):
    if metric == "n":
        return 40.0
    if metric in ("RR", "RW", "WR", "WW", "k"):
        return float(rng.randint(1, 12))
    if metric == "found":
        return float(rng.random() < 0.6)
    if metric == "nll":
        return rng.uniform(0.5, 2.5)
    return rng.uniform(0.05, 0.95)


def _write_unit(st, key, audit, split, values):
    st.write(key, audit, f"fp-{split}", SETTINGS[audit], [(split, m, v) for m, v in values.items()],
             seconds=0.25, split_info={split: {"source": split, "n": 40}})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(db path, values): values[(model_key, audit, split)] = {metric: value}; models {key: (name, method, seed,
    current)}. Read only."""
    import random

    rng = random.Random(0)
    db = tmp_path_factory.mktemp("synthetic") / "audit.sqlite"
    values, models = {}, {}
    with AuditStore(db) as st:
        old = _key("flyp-s1-before-retraining")  # first seen earliest: superseded by the later flyp-s1
        st.add_model(old, "flyp-s1", "/runs/old/flyp-s1", {"kind": "clip", "method": "flyp", "seed": 1})
        models[old] = ("flyp-s1", "flyp", 1, False)
        for method, seeds in METHODS.items():
            for seed in seeds:
                name = _name(method, seed)
                st.add_model(_key(name), name, f"/runs/{name}", {"kind": "clip", "method": method, "seed": seed,
                                                                 "tags": ["synthetic"]})
                models[_key(name)] = (name, method, seed, True)
        for i, key in enumerate(models):  # a fixed order of first_seen (the old key first)
            st.db.execute("UPDATE models SET first_seen = ? WHERE model_key = ?", (1000.0 + i, key))
        for key in list(models) + [ORPHAN]:
            for audit, splits in SPLITS.items():
                if key == ORPHAN and audit != "calibration":
                    continue
                for split in splits:
                    v = {m: _value(rng, audit, m) for m in METRICS[audit]}
                    if audit == "calibration" and key == old:
                        v["ece"] = 0.999  # would move the flyp mean if the superseded key were counted
                    if audit == "spurious" and key == _key("coop-s1"):
                        v["precision_at_10"] = float("nan")  # nothing found
                    _write_unit(st, key, audit, split, v)
                    values[(key, audit, split)] = v
        st.record_failure(None, "load", FileNotFoundError("no such file '/runs/gone'"), name="gone",
                          path="/runs/gone")
        st.record_failure(_key("coop-s2"), "rationality", RuntimeError("<b>boom</b> & more"), name="coop-s2",
                          path="/runs/coop-s2")
    return db, values, models


@pytest.fixture(scope="module")
def report(synthetic, tmp_path_factory):
    db, _, _ = synthetic
    out = tmp_path_factory.mktemp("report")
    res = write_report(db, out, formats=("html", "csv"))
    return out, res, res.index.read_text(encoding="utf-8")


def _section(html, anchor):
    """The HTML from ``id="anchor"`` to the next heading of the same or a higher level."""
    m = re.search(rf'<(h[23]) id="{re.escape(anchor)}">', html)
    assert m, anchor
    level = int(m.group(1)[1])
    rest = html[m.end():]
    stop = re.search(rf"<h[2-{level}][ >]", rest)
    return rest[:stop.start()] if stop else rest


def _hand_summary(values, models, audit, split, method, metric):
    """(mean, std, k, n) over the current models of ``method`` (the orphan key: method '')."""
    vals, n = [], 0
    for (key, a, s), v in values.items():
        if a != audit or s != split:
            continue
        m = models.get(key, ("", "", None, True))
        if m[1] != method or not m[3]:
            continue
        n += 1
        if not math.isnan(v[metric]):
            vals.append(v[metric])
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return mean, std, len(vals), n


def _png(path):
    """Width and height of a valid PNG (signature, IHDR first, IEND last; decodable by matplotlib)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND", path
    w, h = struct.unpack(">II", data[16:24])
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[:2] == (h, w)
    return w, h


# ------------------------------------------------------------------------------------------------- the page


def test_html_lists_every_model_and_metric(synthetic, report):
    db, values, models = synthetic
    out, res, html = report
    assert res.index == out / "index.html" and html.startswith("<!DOCTYPE html>")
    for key, (name, method, seed, current) in models.items():
        label = name if current else f"{name}@{key[:8]}"
        assert f">{label}<" in html or f">{label} <" in html, label
    assert "(superseded)" in html
    assert f">{ORPHAN[:12]}<" in html  # a key without a models row: named by its key
    for audit, metrics in METRICS.items():
        section = _section(html, f"audit-{audit}")
        for m in metrics:
            assert f'title="{m}"' in section, (audit, m)
        n_rows = sum(1 for (k, a, s) in values if a == audit)
        assert section.count("<tr>") == n_rows + 1  # one row per model x split (+ the header)
        assert "variant" not in section  # one (data, settings) per split here
    # static: the sorter is inline, nothing is fetched
    assert "function vlmfastOrder" in html and 'querySelectorAll("table.sortable")' in html
    assert html.count('<table class="sortable">') >= 3 + 3 + 2  # summaries, audits, models, failures
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html) and "<script src" not in html
    assert "@import" not in html and "url(" not in html
    # provenance
    prov = _section(html, "provenance")
    assert f"<th>schema version</th><td>{SCHEMA_VERSION}</td>" in prov
    for audit, s in SETTINGS.items():
        from vlmfast.fleet import settings_key

        assert settings_key(s) in prov
    assert "fp-id" in prov and "fp-sklearn-digits" in prov
    assert "No images: the store holds no artifacts" in _section(html, "notes")  # the synthetic store has none
    assert "No images" in _section(html, "images")


def test_summary_is_the_mean_and_std_computed_by_hand(synthetic, report):
    db, values, models = synthetic
    _, _, html = report
    fleet = load_fleet(db)
    checked = 0
    for audit in METRICS:
        rows = summarize(fleet, audit)
        section = _section(html, f"summary-{audit}")
        groups = {(r.split, r.method) for r in rows}
        methods = set(METHODS) | ({""} if audit == "calibration" else set())
        assert groups == {(s, m) for s in SPLITS[audit] for m in methods}
        for r in rows:
            assert r.seeds == sorted(s for s in METHODS.get(r.method, []) if s is not None)
            assert list(r.stats) == [m for m in KEY_METRICS[audit] if m in METRICS[audit]]
            label = r.method or "(none)"
            tr = [t for t in section.split("<tr>") if t.startswith(f"<td>{label}</td><td>{r.split}</td>")]
            assert len(tr) == 1, (audit, r.method, r.split)
            for metric, stat in r.stats.items():
                mean, std, k, n = _hand_summary(values, models, audit, r.split, r.method, metric)
                assert r.n_models == n and stat.n == k
                assert stat.mean == pytest.approx(mean, rel=1e-12)
                if k > 1:
                    assert stat.std == pytest.approx(std, rel=1e-12)
                    text = f"{mean:.4f} ± {std:.4f}"
                else:
                    assert math.isnan(stat.std)
                    text = f"{mean:.4f}"
                assert f">{text}" in tr[0], (audit, r.method, r.split, metric, text)
                if k < n:
                    assert f"({k}/{n})" in tr[0]
                checked += 1
    assert checked > 40
    # the superseded flyp-s1 (ECE 0.999) is not in the flyp mean
    flyp = [r for r in summarize(fleet, "calibration") if r.method == "flyp" and r.split == "id"][0]
    assert flyp.n_models == 3 and flyp.stats["ece"].mean < 0.95


def test_plots_are_valid_pngs(report):
    out, res, html = report
    for name in ("ece_vs_accuracy.png", "pt_vs_ir.png"):
        path = out / "plots" / name
        assert path in res.files
        w, h = _png(path)
        assert w > 200 and h > 200
        assert f'<img src="plots/{name}"' in html


def test_csv_equals_the_store_rows(synthetic, report):
    db, _, models = synthetic
    out, res, _ = report
    with AuditStore(db, readonly=True) as st:
        for audit in METRICS:
            path = out / f"{audit}.csv"
            assert path in res.files
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            stored = st.results(audit)
            assert len(rows) == len(stored)
            for got, want in zip(rows, stored):
                name, method, seed, _ = models.get(want["model_key"], ("", "", None, True))
                assert (got["model"], got["method"], got["seed"]) == (name, method, "" if seed is None else str(seed))
                for k in ("split", "metric", "model_key", "data_fp", "settings_key"):
                    assert got[k] == want[k]
                if math.isnan(want["value"]):
                    assert got["value"] == ""
                else:
                    assert float(got["value"]) == want["value"]  # repr: exact


def test_failures_are_listed_and_escaped(report):
    _, _, html = report
    failures = _section(html, "failures")
    assert failures.count("<tr>") == 3
    assert "gone" in failures and "FileNotFoundError: no such file" in failures
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt; &amp; more" in failures and "<b>boom" not in html
    assert "Failures (2)" in html


def test_variants_and_plot_options(tmp_path):
    """A split audited with two settings: one row each, a variant column, separate summary groups; plots off."""
    db = tmp_path / "a.sqlite"
    with AuditStore(db) as st:
        for name in ("a", "b"):
            st.add_model(_key(name), name, name, {"method": "ft", "seed": 1 if name == "a" else 2})
            for bins, ece in ((15, 0.1), (10, 0.2)):
                st.write(_key(name), "calibration", "fp", {"n_bins": bins},
                         [("id", "ece", ece + (name == "b") * 0.1), ("id", "accuracy", 0.5)])
    res = write_report(db, tmp_path / "r", plots=False)
    html = res.index.read_text()
    assert res.files == [tmp_path / "r" / "findings.json", res.index] and not (tmp_path / "r" / "plots").exists()
    assert "Plots were turned off" in html
    section = _section(html, "audit-calibration")
    assert section.count("<tr>") == 5 and ">variant<" in section
    rows = summarize(load_fleet(db), "calibration")
    assert len(rows) == 2 and {r.n_models for r in rows} == {2}
    assert sorted(r.stats["ece"].mean for r in rows) == pytest.approx([0.15, 0.25])


def test_no_matplotlib_is_a_note_or_an_error(tmp_path, synthetic, monkeypatch):
    import importlib.util

    db, _, _ = synthetic
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    res = write_report(db, tmp_path / "r")
    assert "matplotlib is not installed" in res.index.read_text()
    assert res.files == [tmp_path / "r" / "findings.json", res.index]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"matplotlib.*vlmfast\[plot\]"):
        build_report(db, tmp_path / "r2", plots=True)
    assert not (tmp_path / "r2").exists()


def test_parquet(tmp_path, synthetic, monkeypatch):
    db, _, _ = synthetic
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        out = build_report(db, tmp_path / "p", formats="parquet")
        assert out == tmp_path / "p"
        with AuditStore(db, readonly=True) as st:
            table = pq.read_table(out / "spurious.parquet").to_pydict()
            stored = st.results("spurious")
        assert table["model_key"] == [r["model_key"] for r in stored]
        assert [None if math.isnan(r["value"]) else r["value"] for r in stored] == table["value"]
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pyarrow is needed for the parquet export"):
        build_report(db, tmp_path / "p2", formats=("csv", "parquet"))
    assert not (tmp_path / "p2").exists()  # checked before anything is written


def test_store_is_only_read(tmp_path, synthetic):
    db, _, _ = synthetic
    copy = tmp_path / "copy.sqlite"
    with AuditStore(db, readonly=True) as st:  # a consistent single-file copy (the WAL folded in)
        st.db.execute(f"VACUUM INTO '{copy}'")
    before = copy.read_bytes()
    build_report(copy, tmp_path / "r", formats="html,csv", plots=False)
    assert copy.read_bytes() == before
    with AuditStore(copy, readonly=True) as st, pytest.raises(ValueError, match="read-only"):
        st.record_failure(None, "load", "x")
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(FileNotFoundError, match="no such audit store"):
        build_report(missing, tmp_path / "r")
    assert not missing.exists()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty SQLite file"):
        load_fleet(empty)
    with pytest.raises(ValueError, match="formats: expected some of"):
        build_report(copy, tmp_path / "r", formats=("html", "xml"))
    with pytest.raises(ValueError, match="out: expected a folder"):
        build_report(copy, copy)
    with pytest.raises(TypeError, match="db: expected"):
        build_report(3, tmp_path / "r")


def test_fmt():
    assert fmt(float("nan")) == "—" and fmt(None) == "—"
    assert fmt(40.0, "n") == "40" and fmt(0.5, "n") == "0.5000"
    assert fmt(0.12345) == "0.1235" and fmt(0.0) == "0.0000" and fmt(2.5e-5) == "2.500e-05"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
def test_sorter_orders_numbers_strings_and_missing_values():
    from vlmfast.fleet.report import SORTER_JS

    script = ("var document = {querySelectorAll: function () { return []; }};\n" + SORTER_JS + """
console.log(JSON.stringify([
  vlmfastOrder(["3", "", "1", "10", "1"], true), vlmfastOrder(["3", "", "1", "10", "1"], false),
  vlmfastOrder(["b", "a10", "a9", ""], true), vlmfastOrder(["2e-3", "-0.5", "0"], true)]));
""")
    got = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert got.strip() == "[[2,4,0,3,1],[3,0,2,4,1],[2,1,0,3],[1,2,0]]"


# ------------------------------------------------------------------------------------------- a real fleet run


def test_report_of_a_real_audit_fleet_run(tmp_path):
    import torch

    from vlmfast.fleet import ManifestEntry, audit_fleet, build_splits
    from vlmfast.models import create_model, save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rn = create_model("vlmfast-tiny-rn", device="cpu").eval()
    save_checkpoint(rn, tmp_path / "runs" / "rn", {"method": "random"})
    entries = [ManifestEntry("rn", "rn", "clip", method="random", seed=1, root=tmp_path / "runs")]
    db = tmp_path / "audit.sqlite"
    s = audit_fleet(entries, ["calibration", "rationality"], db, build_splits(("id",), n=20, seed=0), device="cpu")
    assert s.done == 1 and not s.failed
    res = write_report(db, tmp_path / "report", formats=("html", "csv"))
    html = res.index.read_text()
    assert ">rn<" in html and ">random<" in html
    for m in ("accuracy", "ece", "nll", "pt", "ir"):
        assert f'title="{m}"' in html
    for name in ("ece_vs_accuracy.png", "pt_vs_ir.png"):
        _png(tmp_path / "report" / "plots" / name)
    with AuditStore(db, readonly=True) as st:
        ece = [r["value"] for r in st.results("calibration") if r["metric"] == "ece"][0]
    assert f">{fmt(ece)}<" in _section(html, "summary-calibration")  # one model: the mean is its value
    for rel in ("images/reliability-id.png", "images/heatmaps/rn-id.png"):
        _png(tmp_path / "report" / rel)
        assert f'src="{rel}"' in html and tmp_path / "report" / rel in res.files


def test_pooled_reliability_by_hand():
    """Bins pooled over a method's models: counts summed, accuracy / confidence count-weighted, ECE and MCE of the
    pooled bins, ACE the mean of the models'."""
    from vlmfast.fleet.report import _pooled_result

    a = {"n_bins": 3, "bin_count": [2, 0, 2], "bin_confidence": [0.2, None, 0.9], "bin_accuracy": [0.5, None, 1.0]}
    b = {"n_bins": 3, "bin_count": [2, 1, 0], "bin_confidence": [0.4, 0.5, None], "bin_accuracy": [0.0, 1.0, None]}
    r = _pooled_result([a, b], [0.1, 0.3])
    assert r.bin_count.tolist() == [4, 1, 2]
    assert r.bin_confidence.tolist() == pytest.approx([0.3, 0.5, 0.9])
    assert r.bin_accuracy.tolist() == pytest.approx([0.25, 1.0, 1.0])
    gaps = [0.05, 0.5, 0.1]
    assert float(r.ece) == pytest.approx((4 * 0.05 + 1 * 0.5 + 2 * 0.1) / 7)
    assert float(r.mce) == pytest.approx(max(gaps)) and float(r.ace) == pytest.approx(0.2)
    assert float(r.accuracy) == pytest.approx((4 * 0.25 + 1 + 2) / 7) and r.n_samples == 7


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli(tmp_path, synthetic, capsys, monkeypatch):
    from vlmfast.cli import build_parser, main

    db, _, _ = synthetic
    out = tmp_path / "r"
    assert main(["report", str(db), "--out", str(out), "--format", "html,csv", "--title", "My fleet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"csv: {out / a}.csv" for a in ("calibration", "rationality", "spurious")]
    assert lines[-1] == f"html: {out / 'index.html'}" and f"plot: {out / 'plots' / 'pt_vs_ir.png'}" in lines
    assert "<title>My fleet</title>" in (out / "index.html").read_text()
    assert "report" in build_parser().format_help()

    def err(argv):
        rc = main(argv)
        e = capsys.readouterr().err
        assert rc == 2 and e.count("\n") == 1 and e.startswith("vlmfast report: error: "), (rc, e)
        return e

    missing = tmp_path / "nope.sqlite"
    assert "DB: no such file" in err(["report", str(missing), "--out", str(out)])
    assert not missing.exists()
    assert "DB: expected a SQLite file, got the folder" in err(["report", str(tmp_path), "--out", str(out)])
    assert "--format: expected some of html, csv, parquet, got 'xml'" in err(
        ["report", str(db), "--out", str(out), "--format", "html,xml"])
    assert "--out: expected a folder, got the file" in err(["report", str(db), "--out", str(out / "index.html")])
    assert "the following arguments are required: --out" in err(["report", str(db)])
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    assert "not a vlmfast audit store" in err(["report", str(junk), "--out", str(out)])
    newer = tmp_path / "newer.sqlite"
    AuditStore(newer).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    assert "newer vlmfast" in err(["report", str(newer), "--out", str(out)])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert "pyarrow is needed" in err(["report", str(db), "--out", str(tmp_path / "p"), "--format", "parquet"])


def test_model_images_are_capped_with_a_note(monkeypatch):
    from vlmfast.fleet import report as R

    monkeypatch.setattr(R, "MAX_MODEL_IMAGES", 2)
    notes = []
    assert R._capped([1, 2, 3], "Heatmap overlays", notes) == [1, 2]
    assert notes == ["Heatmap overlays: drawn for the first 2 of 3 models (the store keeps all)."]
    assert R._capped([1], "x", notes) == [1] and len(notes) == 1
