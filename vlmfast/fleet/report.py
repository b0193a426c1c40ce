"""The fleet report: everything an :class:`~vlmfast.fleet.AuditStore` holds, as one static HTML page and as
CSV / Parquet exports (``vlmfast report audit.sqlite --out report/``).

:func:`build_report` writes into the folder ``out``:

=========================  ==========================================================================================
``index.html``             (format ``html``) one self-contained page: inline CSS and a small vanilla-JS table
                           sorter (click or Enter on a header; numbers sort as numbers, a missing value last either
                           way) — nothing is fetched from the network. Sections: whether each seed paper's finding
                           reappears (:mod:`vlmfast.fleet.findings`), the per-method summary, the plots, one table
                           per audit, the models, the failures, the provenance, notes
``findings.json``          (with ``html``) the findings with every number behind each verdict
``plots/*.png``            (with ``html``, when matplotlib is there) ``ece_vs_accuracy.png``: ECE against accuracy of
                           every current model, a panel per split, coloured by method; ``pt_vs_ir.png``: PT against
                           IR, the same way (:func:`vlmfast.plot.scatter_panels`)
``<audit>.csv``            (format ``csv``) one file per audit table that has rows, long format: ``model, method,
                           seed, split, metric, value, model_key, data_fp, settings_key`` — every stored row, in the
                           store's order; NaN (NULL in the store) an empty cell, values in ``repr`` (exact)
``<audit>.parquet``        (format ``parquet``) the same columns (NaN as null) through pyarrow
=========================  ==========================================================================================

**Semantics.**

* *Rows of an audit table*: one per ``(model key, split, data fingerprint, settings key)`` — one per model ×
  split unless a split was audited with several data or settings (then a ``variant`` column names them by the
  first 8 hex digits of each key); one column per metric (the audit's own metrics in the runner's order, then
  any other alphabetically), NaN shown as ``—``.
* *Models* are named by their ``models`` row (a key without one by its first 12 hex digits); ``method`` and
  ``seed`` come from the model card (``method`` ``""`` is shown as ``(none)``). When several keys share a name (a
  retrained model) the one seen last (``first_seen``) is **current**; the older ones are shown in the tables as
  ``name@KEY8`` and marked superseded, and left out of the summary and the plots.
* *Summary* (:func:`summarize`): per audit, per ``(method, split, variant)``, over the current models in the
  group (seeds, or distinct models of a method): for each key metric (:data:`KEY_METRICS`) the mean and the
  sample standard deviation (``n - 1``; ``—`` for a single value) of the values that are not NaN, with ``(k/n)``
  when only ``k`` of the group's ``n`` models have a value.
* *Images* (with ``html`` and matplotlib), from the store's artifacts (schema version 2; :mod:`vlmfast.fleet.runner`
  writes them with each unit): ``images/reliability-<split>.png`` — one panel per method, its current models'
  reliability bins pooled (counts summed, per-bin accuracy and confidence count-weighted; ECE / MCE of the pooled
  bins, ACE the models' mean); ``images/heatmaps/<model>-<split>.png`` — the rationality audit's heatmaps of the
  split's first images over them, digit box outlined (one per current model: its ``id`` split when it has one);
  ``images/spurious/<model>-<split>.png`` — the top spurious cluster's regions. A store without artifacts (audited
  with ``artifacts=False`` or before version 2) gets a note instead.

The store is opened read-only (``AuditStore(db, readonly=True)``): a missing file is a ``FileNotFoundError``, not
a new empty store, and the report never writes into it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vlmfast.fleet.store import AUDIT_TABLES, AuditStore

__all__ = ["FORMATS", "KEY_METRICS", "Fleet", "ModelInfo", "ReportFiles", "Stat", "SummaryRow", "audit_rows",
           "build_report", "fmt", "load_fleet", "render_html", "summarize", "write_report"]

#: The output formats of :func:`build_report`.
FORMATS = ("html", "csv", "parquet")

#: Per audit, the metrics of the per-method summary (those the table has).
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "calibration": ("accuracy", "ece", "ace", "mce", "nll", "brier"),
    "rationality": ("accuracy", "pt", "ir", "mean_rma_correct"),
    "spurious": ("found", "precision_at_10", "top_gap", "top_square_fraction", "silhouette"),
}

#: Per audit, the column order of its table (the runner's metrics); other metrics follow alphabetically.
METRIC_ORDER: dict[str, tuple[str, ...]] = {
    "calibration": ("accuracy", "confidence", "ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier",
                    "ece_per_batch", "n"),
    "rationality": ("accuracy", "pt", "ir", "mean_rma_correct", "RR", "RW", "WR", "WW", "n_constant", "n"),
    "spurious": ("k", "silhouette", "found", "n_clusters", "top_gap", "top_influence", "top_square_fraction",
                 "precision_at_10"),
}

#: Metrics shown as integers (counts).
COUNT_METRICS = frozenset({"n", "k", "RR", "RW", "WR", "WW", "n_constant", "n_clusters", "found"})

#: What a metric is called in headers and plot labels.
METRIC_LABELS = {"accuracy": "accuracy", "ece": "ECE", "ace": "ACE", "mce": "MCE", "mce_weighted": "MCE (weighted)",
                 "rmsce": "RMSCE", "nll": "NLL", "brier": "Brier", "ece_per_batch": "ECE per batch",
                 "pt": "PT", "ir": "IR", "mean_rma_correct": "mean RMA (correct)", "precision_at_10": "Precision@10",
                 "top_gap": "top gap", "top_influence": "top influence", "top_square_fraction": "top square share",
                 "n_clusters": "clusters", "n_constant": "constant maps"}

NO_METHOD = "(none)"


# ------------------------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class ModelInfo:
    """A model of the store: its key, ``name`` (``models.name``), ``label`` (the name, or ``name@KEY8`` for a
    superseded key), the card's ``method`` / ``seed`` / ``kind``, ``path``, ``first_seen`` (Unix time; None for a
    key without a ``models`` row), ``current`` (False when a later key has the same name), ``tags`` and the card's
    ``meta`` (a plan run's strength, train_n, run id)."""

    model_key: str
    name: str
    label: str
    method: str = ""
    seed: int | None = None
    kind: str = ""
    path: str = ""
    first_seen: float | None = None
    current: bool = True
    tags: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Fleet:
    """Everything a report shows, read from a store (:func:`load_fleet`): ``models`` (key -> :class:`ModelInfo`,
    in the store's order), ``results`` (audit -> :meth:`AuditStore.results` rows), ``failures``, ``settings``
    (settings key -> ``{"audit", "settings"}``), ``datasets`` (``[{"data_fp", "split", "info"}]``), ``done``,
    ``meta`` and the store's ``path``."""

    path: Path
    meta: dict[str, str]
    models: dict[str, ModelInfo]
    results: dict[str, list[dict[str, Any]]]
    failures: list[dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    datasets: list[dict[str, Any]]
    done: list[dict[str, Any]]
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def model(self, key: str) -> ModelInfo:
        """The :class:`ModelInfo` of ``key`` (one made up from the key for a key without a ``models`` row)."""
        info = self.models.get(key)
        return info if info is not None else ModelInfo(key, key[:12], key[:12])


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``n - 1``; NaN for fewer than two values) of ``n`` non-NaN values
    (``mean`` NaN when ``n`` is 0)."""

    mean: float
    std: float
    n: int


@dataclass
class SummaryRow:
    """One row of the per-method summary: ``audit``, ``method`` (``""`` for none), ``split``, the variant's
    ``data_fp`` / ``settings_key``, ``n_models`` (the current models of the group), their ``seeds`` (sorted,
    distinct, None left out) and ``stats``: metric -> :class:`Stat`."""

    audit: str
    method: str
    split: str
    data_fp: str
    settings_key: str
    n_models: int
    seeds: list[int] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)


def _open(db: str | os.PathLike | AuditStore) -> tuple[AuditStore, bool]:
    if isinstance(db, AuditStore):
        return db, False
    if not isinstance(db, (str, os.PathLike)):
        raise TypeError(f"db: expected a store path or an AuditStore, got {type(db).__name__}")
    return AuditStore(db, readonly=True), True


def load_fleet(db: str | os.PathLike | AuditStore) -> Fleet:
    """Read everything a report shows from the store ``db`` (a path, opened read-only — a missing file is a
    FileNotFoundError —, or an open :class:`AuditStore`), see the module docs for the semantics."""
    store, owned = _open(db)
    try:
        raw_models = store.models()
        latest: dict[str, tuple[float, str]] = {}
        for m in raw_models:
            mark = (m["first_seen"], m["model_key"])
            if m["name"] not in latest or mark > latest[m["name"]]:
                latest[m["name"]] = mark
        models: dict[str, ModelInfo] = {}
        for m in raw_models:
            card = m["card"] if isinstance(m["card"], dict) else {}
            current = latest[m["name"]][1] == m["model_key"]
            seed = card.get("seed")
            models[m["model_key"]] = ModelInfo(
                m["model_key"], m["name"], m["name"] if current else f"{m['name']}@{m['model_key'][:8]}",
                method=str(card.get("method") or ""),
                seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                kind=str(card.get("kind") or ""), path=m["path"], first_seen=m["first_seen"], current=current,
                tags=tuple(str(t) for t in card.get("tags") or ()),
                meta=dict(card["meta"]) if isinstance(card.get("meta"), dict) else {})
        results = {a: store.results(a) for a in AUDIT_TABLES}
        settings = {k: {"audit": a, "settings": json.loads(s)} for k, a, s in store.db.execute(
            "SELECT settings_key, audit, settings FROM settings ORDER BY audit, settings_key").fetchall()}
        datasets = [{"data_fp": fp, "split": sp, "info": json.loads(info)} for fp, sp, info in store.db.execute(
            "SELECT data_fp, split, info FROM datasets ORDER BY split, data_fp").fetchall()]
        return Fleet(store.path, store.meta(), models, results, store.failures(), settings, datasets, store.done(),
                     store.artifacts())
    finally:
        if owned:
            store.close()


def _metric_order(audit: str, metrics: Iterable[str]) -> list[str]:
    present = set(metrics)
    known = [m for m in METRIC_ORDER.get(audit, ()) if m in present]
    return known + sorted(present - set(known))


def audit_rows(fleet: Fleet, audit: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The table of ``audit``: ``(metrics, rows)``, each row ``{"model_key", "split", "data_fp", "settings_key",
    "values": {metric: value}}`` (module docs), ordered by model (the store's order), split, data, settings."""
    if audit not in AUDIT_TABLES:
        raise ValueError(f"audit: expected one of {AUDIT_TABLES}, got {audit!r}")
    order = {k: i for i, k in enumerate(fleet.models)}
    groups: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for r in fleet.results[audit]:
        groups.setdefault((r["model_key"], r["split"], r["data_fp"], r["settings_key"]), {})[r["metric"]] = r["value"]
    keys = sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[0], k[1], k[2], k[3]))
    metrics = _metric_order(audit, {m for v in groups.values() for m in v})
    rows = [{"model_key": k[0], "split": k[1], "data_fp": k[2], "settings_key": k[3], "values": groups[k]}
            for k in keys]
    return metrics, rows


def _stat(values: Sequence[float]) -> Stat:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else float("nan"),
                len(finite))


def summarize(fleet: Fleet, audit: str, metrics: Sequence[str] | None = None) -> list[SummaryRow]:
    """The per-method summary of ``audit`` (module docs): one :class:`SummaryRow` per ``(method, split, data
    fingerprint, settings key)`` of the current models, ordered by split, method, variant. ``metrics``: the
    metrics to summarize (default :data:`KEY_METRICS` of the audit, those present)."""
    table_metrics, rows = audit_rows(fleet, audit)
    if metrics is None:
        metrics = [m for m in KEY_METRICS.get(audit, ()) if m in table_metrics]
    elif isinstance(metrics, str):
        raise TypeError(f"metrics: expected a sequence of metric names, got the str {metrics!r}")
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        info = fleet.model(r["model_key"])
        if not info.current:
            continue
        groups.setdefault((r["split"], info.method, r["data_fp"], r["settings_key"]), []).append(r)
    out = []
    for (split, method, fp, skey), members in sorted(groups.items(), key=lambda kv: kv[0]):
        seeds = sorted({s for s in (fleet.model(r["model_key"]).seed for r in members) if s is not None})
        stats = {m: _stat([r["values"].get(m, float("nan")) for r in members]) for m in metrics}
        out.append(SummaryRow(audit, method, split, fp, skey, len(members), seeds, stats))
    return out


def _variants(rows: Iterable[Mapping[str, Any]]) -> bool:
    """True when some split of the rows has more than one (data, settings) variant."""
    seen: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        seen.setdefault(r["split"], set()).add((r["data_fp"], r["settings_key"]))
    return any(len(v) > 1 for v in seen.values())


def _variant_label(data_fp: str, settings_key: str) -> str:
    return f"data {data_fp[:8]} · settings {settings_key[:8]}"


# ------------------------------------------------------------------------------------------------ formatting


def fmt(value: float | None, metric: str = "") -> str:
    """A value as the report shows it: ``—`` for NaN / None, counts as integers, otherwise 4 decimals (scientific
    notation below 0.001 or from 100,000 on)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    v = float(value)
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if metric in COUNT_METRICS and v.is_integer():
        return str(int(v))
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4f}"
    return f"{v:.3e}"


def _sort_key(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _utc(t: float | str | None) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "—"


def _table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[tuple[str, str | None]]], *,
           cls: str = "sortable", empty: str = "none") -> str:
    """An HTML table: ``headers`` ``[(text, title)]``; each row's cells ``(html, sort key or None)``; a sort key
    becomes ``data-sort`` (the number the sorter compares; ``""``: missing)."""
    head = "".join('<th scope="col"' + (f' title="{_e(title)}"' if title else "") + f">{_e(text)}</th>"
                   for text, title in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td data-sort="{_e(key)}" class="num">{cell}</td>' if key is not None else f"<td>{cell}</td>"
                        for cell, key in row)
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return f'<p class="empty">{_e(empty)}</p>'
    return (f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-top:1.2em}table{border-collapse:collapse;margin:.4em 0 1em;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
thead th{background:#f3f5f8;position:sticky;top:0}
table.sortable thead th{cursor:pointer;user-select:none}
table.sortable thead th:after{content:" \\2195";color:#aaa}
table.sortable thead th[aria-sort=ascending]:after{content:" \\2191";color:#333}
table.sortable thead th[aria-sort=descending]:after{content:" \\2193";color:#333}
tbody tr:nth-child(even){background:#fafbfc}tr.superseded td{color:#888}
.muted{color:#777}.empty{color:#777;font-style:italic}nav a{margin-right:1em}
pre{background:#f6f8fa;padding:.5em;overflow:auto;max-height:20em;font-size:12px;margin:0}
figure{display:inline-block;margin:0 1.5em 1em 0}figure img{max-width:100%;border:1px solid #ddd}
code{background:#f3f5f8;padding:0 .2em}
.verdict{font-weight:600;padding:0 .3em;border-radius:3px}.verdict.yes{background:#dcf5dc}
.verdict.partly{background:#fdf3d0}.verdict.no{background:#fadcdc}ul.findings>li{margin-bottom:.6em}
"""

#: The table sorter: pure ``vlmfastOrder`` (testable without a DOM) and the wiring of every ``table.sortable``.
SORTER_JS = r"""
function vlmfastOrder(raws, asc) {
  // raws: the cells' sort strings; returns the row indices in sorted order. A column whose non-empty cells are
  // all numbers sorts numerically; an empty cell (a missing value) goes last in both directions; ties keep
  // their order.
  var keyed = raws.map(function (raw, i) {
    var t = String(raw).trim();
    return {i: i, raw: t, num: t === "" ? NaN : Number(t)};
  });
  var numeric = keyed.every(function (k) { return k.raw === "" || !isNaN(k.num); });
  keyed.sort(function (a, b) {
    var am = a.raw === "", bm = b.raw === "";
    if (am || bm) { return am && bm ? a.i - b.i : (am ? 1 : -1); }
    var c = numeric ? a.num - b.num : a.raw.localeCompare(b.raw, undefined, {numeric: true});
    return (asc ? c : -c) || a.i - b.i;
  });
  return keyed.map(function (k) { return k.i; });
}
function vlmfastSortable(table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    function sort() {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var raws = rows.map(function (row) {
        var cell = row.cells[col];
        if (!cell) { return ""; }
        return cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
      });
      vlmfastOrder(raws, asc).forEach(function (i) { body.appendChild(rows[i]); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
    });
  });
}
Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), vlmfastSortable);
"""


# ------------------------------------------------------------------------------------------------ sections


def _model_cells(info: ModelInfo) -> list[tuple[str, str | None]]:
    name = _e(info.label) + ("" if info.current else ' <span class="muted">(superseded)</span>')
    return [(f'<span title="{_e(info.model_key)}">{name}</span>', None), (_e(info.method or NO_METHOD), None),
            ("—" if info.seed is None else _e(info.seed), _sort_key(None if info.seed is None else float(info.seed)))]


def _summary_section(fleet: Fleet) -> str:
    parts = []
    for audit in AUDIT_TABLES:
        rows = summarize(fleet, audit)
        if not rows:
            continue
        metrics = list(rows[0].stats)
        variant = _variants({"split": r.split, "data_fp": r.data_fp, "settings_key": r.settings_key} for r in rows)
        headers = [("method", ""), ("split", "")] + ([("variant", "data fingerprint · settings key")] if variant
                                                     else [])
        headers += [("models", "current models in the group"), ("seeds", "")]
        headers += [(f"{_label(m)} (mean ± std)", f"{m}: mean ± sample std over the group's models") for m in metrics]
        body = []
        for r in rows:
            cells: list[tuple[str, str | None]] = [(_e(r.method or NO_METHOD), None), (_e(r.split), None)]
            if variant:
                cells.append((_e(_variant_label(r.data_fp, r.settings_key)), None))
            cells += [(str(r.n_models), str(r.n_models)), (_e(", ".join(map(str, r.seeds)) or "—"), None)]
            for m in metrics:
                s = r.stats[m]
                text = "—" if s.n == 0 else fmt(s.mean) + (f" ± {fmt(s.std)}" if s.n > 1 else "")
                if 0 < s.n < r.n_models:
                    text += f' <span class="muted">({s.n}/{r.n_models})</span>'
                cells.append((text, _sort_key(s.mean)))
            body.append(cells)
        parts.append(f'<h3 id="summary-{audit}">{_e(audit)}</h3>' + _table(headers, body))
    if not parts:
        return '<p class="empty">No results in the store.</p>'
    return ('<p>Per method and split, over the current models of the method (its seeds): mean ± sample standard '
            'deviation (n − 1) of each key metric, NaN values left out — <span class="muted">(k/n)</span> when '
            'only k of the n models have a value.</p>' + "".join(parts))


def _findings_section(findings: Sequence[Any]) -> str:
    if not findings:
        return '<p class="empty">No findings checked.</p>'
    items = []
    for f in findings:
        cls = {"reappears": "yes", "partly": "partly", "does not reappear": "no"}.get(f.verdict, "muted")
        lines = "".join(f"<li>{_e(line)}</li>" for line in f.lines())
        items.append(f'<li><b>{_e(f.paper)}</b> — <i>{_e(f.claim)}</i>: <span class="verdict {cls}">'
                     f"{_e(f.verdict)}</span><ul>{lines}</ul></li>")
    return ('<p>Each seed paper\'s finding, checked on the numbers of this store (rule: '
            '<code>vlmfast.fleet.findings</code> — a comparison counts when the mean moves the paper\'s way by more '
            'than the seed spread; values in percent).</p><ul class="findings">' + "".join(items) + "</ul>")


def _audit_section(fleet: Fleet, audit: str) -> str:
    metrics, rows = audit_rows(fleet, audit)
    if not rows:
        return '<p class="empty">No results.</p>'
    variant = _variants(rows)
    headers = [("model", "hover a name for its model key"), ("method", ""), ("seed", ""), ("split", "")]
    if variant:
        headers.append(("variant", "data fingerprint · settings key (the split was audited several ways)"))
    headers += [(_label(m), m) for m in metrics]
    body = []
    for r in rows:
        info = fleet.model(r["model_key"])
        cells = _model_cells(info) + [(_e(r["split"]), None)]
        if variant:
            cells.append((_e(_variant_label(r["data_fp"], r["settings_key"])), None))
        cells += [(fmt(r["values"].get(m), m), _sort_key(r["values"].get(m))) for m in metrics]
        body.append(cells)
    n_models = len({r["model_key"] for r in rows})
    return f'<p class="muted">{len(rows)} rows, {n_models} models, {len(metrics)} metrics.</p>' + _table(headers, body)


def _models_section(fleet: Fleet) -> str:
    keys = list(fleet.models)
    for audit in AUDIT_TABLES:  # keys with results but no models row
        for r in fleet.results[audit]:
            if r["model_key"] not in fleet.models and r["model_key"] not in keys:
                keys.append(r["model_key"])
    units: dict[str, int] = {}
    for d in fleet.done:
        units[d["model_key"]] = units.get(d["model_key"], 0) + 1
    headers = [("model", ""), ("method", ""), ("seed", ""), ("kind", ""), ("model key", "SHA-256 of the weights"),
               ("units", "audit × split units committed"), ("first seen", ""), ("path", ""), ("tags", "")]
    body = []
    for k in keys:
        info = fleet.model(k)
        body.append(_model_cells(info) + [
            (_e(info.kind or "—"), None), (f'<code title="{_e(k)}">{_e(k[:12])}</code>', None),
            (str(units.get(k, 0)), str(units.get(k, 0))), (_e(_utc(info.first_seen)), None),
            (_e(info.path or "—"), None), (_e(", ".join(info.tags) or "—"), None)])
    return _table(headers, body, empty="No models recorded.")


def _failures_section(fleet: Fleet) -> str:
    headers = [("model", ""), ("audit", '"load": the model did not hash or load'), ("error", ""),
               ("model key", ""), ("path", ""), ("at", "")]
    body = [[(_e(f["name"] or "—"), None), (_e(f["audit"]), None), (f'<code>{_e(f["error"])}</code>', None),
             (f'<code title="{_e(f["model_key"] or "")}">{_e((f["model_key"] or "—")[:12])}</code>', None),
             (_e(f["path"] or "—"), None), (_e(_utc(f["at"])), None)] for f in fleet.failures]
    return _table(headers, body, empty="No failures recorded.")


def _provenance_section(fleet: Fleet, generated: str) -> str:
    meta = fleet.meta
    seconds = sum(d["seconds"] or 0.0 for d in fleet.done)
    per_audit = {a: sum(1 for d in fleet.done if d["audit"] == a) for a in AUDIT_TABLES}
    items = [("store", str(fleet.path)), ("schema version", meta.get("schema_version", "—")),
             ("written by vlmfast", meta.get("vlmfast_version", "—")),
             ("store created", _utc(meta.get("created_at"))),
             ("report generated", generated),
             ("units committed", ", ".join(f"{a}: {n}" for a, n in per_audit.items()) + f" ({seconds:.1f} s compute)")]
    out = ["<table><tbody>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
           + "</tbody></table>"]
    out.append("<h3>Audit settings</h3>")
    out.append(_table([("settings key", ""), ("audit", ""), ("settings", "")],
                      [[(f"<code>{_e(k)}</code>", None), (_e(v["audit"]), None),
                        (f"<pre>{_e(json.dumps(v['settings'], indent=1, sort_keys=True))}</pre>", None)]
                       for k, v in fleet.settings.items()], cls="plain", empty="No settings recorded."))
    out.append("<h3>Evaluation data</h3>")
    out.append(_table([("data fingerprint", ""), ("split", ""), ("info", "")],
                      [[(f"<code>{_e(d['data_fp'])}</code>", None), (_e(d["split"]), None),
                        (f"<code>{_e(json.dumps(d['info'], sort_keys=True))}</code>", None)]
                       for d in fleet.datasets], cls="plain", empty="No data fingerprints recorded."))
    return "".join(out)


# ------------------------------------------------------------------------------------------------ plots


def _scatter_points(fleet: Fleet, audit: str, x: str, y: str) -> dict[str, list[tuple[float, float, str]]]:
    """Panel title -> ``[(x, y, method)]`` of the current models (a panel per split, per variant if several)."""
    metrics, rows = audit_rows(fleet, audit)
    if x not in metrics or y not in metrics:
        return {}
    variant = _variants(rows)
    panels: dict[str, list[tuple[float, float, str]]] = {}
    for r in sorted(rows, key=lambda r: (r["split"], r["data_fp"], r["settings_key"])):
        info = fleet.model(r["model_key"])
        if not info.current:
            continue
        title = r["split"] + (f" ({_variant_label(r['data_fp'], r['settings_key'])})" if variant else "")
        panels.setdefault(title, []).append((r["values"].get(x, float("nan")), r["values"].get(y, float("nan")),
                                             info.method or NO_METHOD))
    return panels


#: The scatter plots: file name, audit, x metric, y metric, title, axis limits.
PLOTS = (
    ("ece_vs_accuracy.png", "calibration", "accuracy", "ece", "ECE vs accuracy across the fleet", (-0.02, 1.02),
     (0.0, None)),
    ("pt_vs_ir.png", "rationality", "pt", "ir", "PT vs IR across the fleet", (-0.02, 1.02), (-0.02, 1.02)),
)


def _plots(fleet: Fleet, out: Path, plots: bool | None, notes: list[str]) -> list[tuple[str, str]]:
    """Write the scatter plots; returns ``[(relative path, caption)]``. ``plots`` None: only when matplotlib is
    there (a note otherwise); True: required (ImportError naming the extra); False: none."""
    if plots is False:
        notes.append("Plots were turned off (plots=False / --no-plots).")
        return []
    if plots is None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            notes.append("No plots: matplotlib is not installed (pip install 'vlmfast[plot]').")
            return []
    from vlmfast.plot import scatter_panels

    written = []
    for name, audit, x, y, title, xlim, ylim in PLOTS:
        panels = _scatter_points(fleet, audit, x, y)
        if not panels:
            notes.append(f"No {title[:title.index(' across')]} plot: the store has no {audit} results with "
                         f"{x} and {y}.")
            continue
        scatter_panels(panels, out / "plots" / name, xlabel=_label(x), ylabel=_label(y), title=title, xlim=xlim,
                       ylim=ylim)
        n = sum(len(pts) for pts in panels.values())
        written.append((f"plots/{name}", f"{title}: {_label(y)} against {_label(x)} of every current model, a "
                                         f"panel per split, coloured by method ({n} points)."))
    return written


# ------------------------------------------------------------------------------------------------ images


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80] or "_"


def _current_artifacts(fleet: Fleet, audit: str, name: str) -> list[dict[str, Any]]:
    """The current models' artifacts ``name`` of ``audit``, in the store's model order, then split."""
    order = {k: i for i, k in enumerate(fleet.models)}
    arts = [a for a in fleet.artifacts if a["audit"] == audit and a["name"] == name
            and fleet.model(a["model_key"]).current]
    return sorted(arts, key=lambda a: (order.get(a["model_key"], len(order)), a["split"], a["data_fp"]))


def _pooled_result(members: list[dict[str, Any]], aces: list[float]) -> Any:
    """A one-model CalibrationResult of reliability bins pooled over ``members`` (counts summed, per-bin accuracy
    and confidence count-weighted); ECE / MCE from the pooled bins, ACE the mean of the models' ``aces``."""
    import torch

    from vlmfast.metrics import CalibrationResult

    cnt = torch.stack([torch.tensor(m["bin_count"], dtype=torch.float64) for m in members]).sum(0)

    def pooled(key: str) -> Any:
        vals = torch.stack([torch.tensor([float("nan") if v is None else v for v in m[key]], dtype=torch.float64)
                            for m in members])
        w = torch.stack([torch.tensor(m["bin_count"], dtype=torch.float64) for m in members])
        tot = (torch.nan_to_num(vals) * w).sum(0)
        return torch.where(cnt > 0, tot / cnt.clamp_min(1), torch.full_like(cnt, float("nan")))

    conf, acc = pooled("bin_confidence"), pooled("bin_accuracy")
    n = float(cnt.sum())
    gap = torch.where(cnt > 0, (acc - conf).abs(), torch.zeros_like(cnt))
    ece = float((gap * cnt).sum() / max(n, 1))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    finite = [a for a in aces if not math.isnan(a)]
    return CalibrationResult(
        ece=torch.tensor(ece), ace=torch.tensor(statistics.fmean(finite) if finite else float("nan")),
        mce=torch.tensor(float(gap.max()) if n else float("nan")), mce_weighted=nan, rmsce=nan, nll=nan, brier=nan,
        accuracy=torch.tensor(float(torch.nan_to_num(acc) @ cnt) / max(n, 1)), confidence=nan,
        bin_count=cnt, bin_confidence=conf, bin_accuracy=acc, n_bins=int(members[0]["n_bins"]), n_samples=int(n),
        binning=members[0].get("binning", "width"), convention=members[0].get("convention", "standard"))


def _group_label(fleet: Fleet, key: str) -> str:
    """A model's method, with the strength of its planted feature when it was trained with one."""
    info = fleet.model(key)
    s = info.meta.get("strength")
    ok = isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0
    return (info.method or NO_METHOD) + (f", strength {s:g}" if ok else "")


def _reliability_images(fleet: Fleet, out: Path) -> list[tuple[str, str]]:
    from vlmfast.plot import reliability_diagram

    aces = {(r["model_key"], r["split"]): r["value"] for r in fleet.results["calibration"] if r["metric"] == "ace"}
    by_split: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    for a in _current_artifacts(fleet, "calibration", "reliability"):
        data = json.loads(a["data"])
        by_split.setdefault(a["split"], {}).setdefault(_group_label(fleet, a["model_key"]), []).append(
            (a["model_key"], data))
    written = []
    for split, methods in sorted(by_split.items()):
        names, results = [], []
        for method, members in methods.items():
            if len({m["n_bins"] for _, m in members}) != 1:
                continue  # different bin counts (settings) cannot be pooled
            names.append(f"{method} ({len(members)} model{'s' if len(members) > 1 else ''})")
            results.append(_pooled_result([m for _, m in members],
                                          [aces.get((k, split), float("nan")) for k, _ in members]))
        if not results:
            continue
        import torch

        from vlmfast.metrics import CalibrationResult

        stack = {f: torch.stack([getattr(r, f) for r in results]) for f in (
            "ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier", "accuracy", "confidence", "bin_count",
            "bin_confidence", "bin_accuracy")}
        res = CalibrationResult(**stack, n_bins=results[0].n_bins, n_samples=max(r.n_samples for r in results),
                                binning=results[0].binning, convention=results[0].convention)
        rel = f"images/reliability-{_slug(split)}.png"
        reliability_diagram(res, out / rel, names, max_models=len(names),
                            title=f"Reliability per method, split {split} (bins pooled over the method's models)")
        written.append((rel, f"Reliability diagrams on {split}: one panel per method (and strength of the planted "
                             "feature), bins pooled over its current models (ECE and MCE of the pooled bins, ACE "
                             "the models' mean)."))
    return written


def _tensors(blob: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(blob)


#: At most this many heatmap grids and galleries each (the first models in the store's order; a note says so).
MAX_MODEL_IMAGES = 60


def _capped(items: list, what: str, notes: list[str]) -> list:
    if len(items) > MAX_MODEL_IMAGES:
        notes.append(f"{what}: drawn for the first {MAX_MODEL_IMAGES} of {len(items)} models (the store keeps all).")
    return items[:MAX_MODEL_IMAGES]


def _heatmap_images(fleet: Fleet, out: Path, notes: list[str]) -> list[tuple[str, str, str]]:
    """One overlay grid per current model (its ``id`` split when it has one, else its first): ``[(path, caption,
    method)]``."""
    from vlmfast.plot import heatmap_overlays

    seen: dict[str, dict[str, Any]] = {}
    for a in _current_artifacts(fleet, "rationality", "heatmaps"):
        if a["model_key"] not in seen or a["split"] == "id":
            seen[a["model_key"]] = a
    written = []
    for key, a in _capped(list(seen.items()), "Heatmap overlays", notes):
        info = fleet.model(key)
        t = _tensors(a["data"])
        titles = [f"{int(y)} {'correct' if c else 'wrong'}" for y, c in zip(t["labels"].tolist(),
                                                                           t["correct"].tolist())]
        rel = f"images/heatmaps/{_slug(info.label)}-{_slug(a['split'])}.png"
        heatmap_overlays(t["images"], t["maps"].float(), t["masks"].bool(), out / rel, titles, ncols=8,
                         title=f"{info.label} ({info.method or NO_METHOD}) on {a['split']}: heatmaps, digit box "
                               "outlined")
        written.append((rel, f"{info.label} on {a['split']}", info.method or NO_METHOD))
    return written


def _gallery_images(fleet: Fleet, out: Path, notes: list[str]) -> list[tuple[str, str, str]]:
    from vlmfast.data import CLASSNAMES
    from vlmfast.plot import region_gallery

    written = []
    for a in _capped(_current_artifacts(fleet, "spurious", "top_cluster"), "Spurious-cluster galleries", notes):
        info = fleet.model(a["model_key"])
        t = _tensors(a["data"])
        attr = int(t["attribute"][0])
        name = CLASSNAMES[attr] if 0 <= attr < len(CLASSNAMES) else "?"
        titles = ["red square" if s else "no square" for s in t["is_spurious"].tolist()]
        rel = f"images/spurious/{_slug(info.label)}-{_slug(a['split'])}.png"
        region_gallery(t["images"], t["boxes"], out / rel, titles, ncols=10,
                       title=f"{info.label} ({info.method or NO_METHOD}): top cluster's regions, attribute {name!r}")
        share = float(t["is_spurious"].float().mean())
        written.append((rel, f"{info.label} on {a['split']}: attribute {name!r}, {100 * share:.0f} % of the shown "
                             "regions are the red square", info.method or NO_METHOD))
    return written


def _images(fleet: Fleet, out: Path, plots: bool | None, notes: list[str]) -> dict[str, list]:
    """The report's images from the store's artifacts (matplotlib as for the plots)."""
    if plots is False or not fleet.artifacts:
        if not fleet.artifacts:
            notes.append("No images: the store holds no artifacts (audits run with artifacts=False, or a store "
                         "written before schema version 2).")
        return {}
    if plots is None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            return {}
    return {"reliability": _reliability_images(fleet, out), "heatmaps": _heatmap_images(fleet, out, notes),
            "spurious": _gallery_images(fleet, out, notes)}


def _images_section(images: Mapping[str, list]) -> str:
    if not any(images.values()):
        return '<p class="empty">No images (see the notes).</p>'

    def fig(p: str, c: str) -> str:
        return (f'<figure><a href="{_e(p)}"><img src="{_e(p)}" alt="{_e(c)}" loading="lazy"></a>'
                f"<figcaption>{_e(c)}</figcaption></figure>")

    parts = []
    if images.get("reliability"):
        parts.append('<h3 id="images-reliability">Reliability diagrams</h3>'
                     + "".join(fig(p, c) for p, c in images["reliability"]))
    for key, head in (("heatmaps", "Heatmap overlays (rationality audit: the first images of the split)"),
                      ("spurious", "Spurious-cluster galleries (the top cluster's regions)")):
        if not images.get(key):
            continue
        by_method: dict[str, list[tuple[str, str]]] = {}
        for p, c, m in images[key]:
            by_method.setdefault(m, []).append((p, c))
        parts.append(f'<h3 id="images-{key}">{_e(head)}</h3>' + "".join(
            f"<details><summary>{_e(m)} ({len(v)})</summary>" + "".join(fig(p, c) for p, c in v) + "</details>"
            for m, v in by_method.items()))
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ the page


def render_html(fleet: Fleet, plots: Sequence[tuple[str, str]] = (), notes: Sequence[str] = (), *,
                title: str = "vlmfast fleet report", images: Mapping[str, list] | None = None,
                findings: Sequence[Any] | None = None) -> str:
    """The report page (module docs) of ``fleet`` with the written ``plots`` (``[(relative path, caption)]``),
    ``images`` (:func:`_images`), ``notes`` and ``findings`` (:func:`vlmfast.fleet.findings.check_findings` of
    ``fleet``; computed here when None)."""
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    n_results = sum(len(v) for v in fleet.results.values())
    audits = [a for a in AUDIT_TABLES if fleet.results[a]]
    if findings is None:
        from vlmfast.fleet.findings import check_findings

        findings = check_findings(fleet)
    nav = [("findings", "Findings"), ("summary", "Summary"), ("plots", "Plots"), ("images", "Images")]
    nav += [(f"audit-{a}", a) for a in audits] + [
        ("models", "Models"), ("failures", f"Failures ({len(fleet.failures)})"), ("provenance", "Provenance"),
        ("notes", "Notes")]
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="muted">{len(fleet.models)} models, {n_results} results '
            f'({", ".join(f"{a}: {len(fleet.results[a])}" for a in AUDIT_TABLES)}), {len(fleet.failures)} failures '
            f'— store <code>{_e(fleet.path)}</code>, generated {_e(generated)}. Click a column header to sort.</p>',
            "<nav>" + "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in nav) + "</nav>",
            '<h2 id="findings">Do the papers\' findings reappear?</h2>', _findings_section(findings),
            '<h2 id="summary">Per-method summary</h2>', _summary_section(fleet),
            '<h2 id="plots">Plots</h2>']
    if plots:
        body.append("".join(f'<figure><a href="{_e(p)}"><img src="{_e(p)}" alt="{_e(c)}" loading="lazy"></a>'
                            f"<figcaption>{_e(c)}</figcaption></figure>" for p, c in plots))
    else:
        body.append('<p class="empty">No plots (see the notes).</p>')
    body += ['<h2 id="images">Images</h2>', _images_section(images or {})]
    for a in audits:
        body += [f'<h2 id="audit-{a}">{_e(a)}</h2>', _audit_section(fleet, a)]
    body += ['<h2 id="models">Models</h2>', _models_section(fleet),
             '<h2 id="failures">Failures</h2>', _failures_section(fleet),
             '<h2 id="provenance">Provenance</h2>', _provenance_section(fleet, generated),
             '<h2 id="notes">Notes</h2>', "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + f"\n<script>{SORTER_JS}</script>\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ exports

#: The columns of the CSV / Parquet exports.
EXPORT_COLUMNS = ("model", "method", "seed", "split", "metric", "value", "model_key", "data_fp", "settings_key")


def _export_rows(fleet: Fleet, audit: str) -> list[tuple[Any, ...]]:
    out = []
    for r in fleet.results[audit]:
        info = fleet.models.get(r["model_key"])
        out.append((r["name"], info.method if info else "", info.seed if info else None, r["split"], r["metric"],
                    r["value"], r["model_key"], r["data_fp"], r["settings_key"]))
    return out


def _write_csv(fleet: Fleet, out: Path) -> list[Path]:
    from vlmfast._cache import atomic_target

    written = []
    for audit in AUDIT_TABLES:
        rows = _export_rows(fleet, audit)
        if not rows:
            continue
        path = out / f"{audit}.csv"
        with atomic_target(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(EXPORT_COLUMNS)
                for name, method, seed, split, metric, value, *keys in rows:
                    w.writerow([name, method, "" if seed is None else seed, split, metric,
                                "" if math.isnan(value) else repr(value), *keys])
        written.append(path)
    return written


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(f"pyarrow is needed for the parquet export (vlmfast report --format parquet): pip install "
                          f"pyarrow (import failed: {e})", name="pyarrow") from e
    return pyarrow, pyarrow.parquet


def _write_parquet(fleet: Fleet, out: Path) -> list[Path]:
    from vlmfast._cache import atomic_target

    pa, pq = _pyarrow()
    types = (pa.string(), pa.string(), pa.int64(), pa.string(), pa.string(), pa.float64(), pa.string(), pa.string(),
             pa.string())
    written = []
    for audit in AUDIT_TABLES:
        rows = _export_rows(fleet, audit)
        if not rows:
            continue
        cols = list(zip(*rows))
        cols[5] = tuple(None if math.isnan(v) else v for v in cols[5])
        table = pa.table({name: pa.array(list(col), type=t) for name, col, t in zip(EXPORT_COLUMNS, cols, types)})
        path = out / f"{audit}.parquet"
        with atomic_target(path) as tmp:
            pq.write_table(table, str(tmp))
        written.append(path)
    return written


def _formats(formats: str | Sequence[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    elif not isinstance(formats, (list, tuple)) or not all(isinstance(f, str) for f in formats):
        raise TypeError(f"formats: expected a sequence of format names, got {formats!r:.80}")
    fs = list(dict.fromkeys(formats))
    if not fs:
        raise ValueError(f"formats: expected some of {FORMATS}, got none")
    for f in fs:
        if f not in FORMATS:
            raise ValueError(f"formats: expected some of {FORMATS}, got {f!r}")
    return fs


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote: ``index`` (``out/index.html``, None without ``html``), every file written
    (``files``, in order: exports, plots, the page), the page's ``notes`` (plots skipped and why, ...) and its
    ``findings`` (:class:`vlmfast.fleet.findings.Finding`)."""

    out: Path
    index: Path | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    findings: list[Any] = field(default_factory=list)  # the page's findings (with html)


def write_report(db: str | os.PathLike | AuditStore, out: str | os.PathLike, *,
                 formats: str | Sequence[str] = ("html",), plots: bool | None = None,
                 title: str = "vlmfast fleet report") -> ReportFiles:
    """:func:`build_report`, returning every file written and the notes (:class:`ReportFiles`)."""
    fs = _formats(formats)
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out: expected a folder path, got {type(out).__name__}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a folder, got the file {str(out)!r}")
    if plots is not None and not isinstance(plots, bool):
        raise TypeError(f"plots: expected True, False or None, got {plots!r}")
    if not isinstance(title, str):
        raise TypeError(f"title: expected a str, got {type(title).__name__}")
    if "parquet" in fs:
        _pyarrow()
    if plots and "html" in fs:
        from vlmfast._optional import require

        require("matplotlib.figure", "the report's plots")
    fleet = load_fleet(db)
    out.mkdir(parents=True, exist_ok=True)
    result = ReportFiles(out)
    if "csv" in fs:
        result.files += _write_csv(fleet, out)
    if "parquet" in fs:
        result.files += _write_parquet(fleet, out)
    if "html" not in fs:
        return result
    written = _plots(fleet, out, plots, result.notes)
    result.files += [out / p for p, _ in written]
    images = _images(fleet, out, plots, result.notes)
    result.files += [out / p for v in images.values() for p, *_ in v]
    result.notes += [
        "Superseded models (an older key of a name that was retrained) are in the tables, not in the summary, the "
        "plots or the images."]
    from vlmfast._cache import atomic_target
    from vlmfast.fleet.findings import check_findings

    result.findings = check_findings(fleet)
    findings_path = out / "findings.json"
    with atomic_target(findings_path) as tmp:
        tmp.write_text(json.dumps([f.as_dict() for f in result.findings], indent=1, allow_nan=False),
                       encoding="utf-8")
    result.files.append(findings_path)
    index = out / "index.html"
    with atomic_target(index) as tmp:
        tmp.write_text(render_html(fleet, written, result.notes, title=title, images=images,
                                   findings=result.findings), encoding="utf-8")
    result.index = index
    result.files.append(index)
    return result


def build_report(db: str | os.PathLike | AuditStore, out: str | os.PathLike, *,
                 formats: str | Sequence[str] = ("html",), plots: bool | None = None,
                 title: str = "vlmfast fleet report") -> Path:
    """Write the report of the store ``db`` into the folder ``out`` (created; files of the same names replaced,
    each in one rename) in ``formats`` (some of :data:`FORMATS`, or one comma-separated str); see the module docs
    for the files and their semantics.

    ``db``: a store path (opened read-only: a missing file is a FileNotFoundError and nothing is created) or an
    open :class:`AuditStore`. ``plots`` (with ``html``): None draws them when matplotlib is installed and says so
    on the page when not; True requires it (ImportError naming the extra); False draws none. ``title``: the page's.
    Arguments, the extras asked for and the store are checked before anything is written (``parquet`` without
    pyarrow fails before any file is written).

    Returns ``out/index.html`` when ``html`` is among the formats, else the folder ``out``
    (:func:`write_report` returns every file written).
    """
    result = write_report(db, out, formats=formats, plots=plots, title=title)
    return result.index if result.index is not None else result.out
