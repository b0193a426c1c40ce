"""The fleet's results store: one SQLite file (stdlib :mod:`sqlite3`, WAL journal) that every audit of every model
writes into, keyed so that a re-run computes only what changed.

**Keys.** A result row belongs to ``(model_key, data_fp, settings_key, split, metric)``:

* ``model_key`` — the SHA-256 identity of the audited weights (:func:`vlmfast.fleet.manifest.model_key`: the
  streamed SHA-256 of the checkpoint file(s) and the entry's kind), so a retrained model gets a new key and a copy
  of the same file the same one;
* ``data_fp`` — a fingerprint of the evaluation split (:func:`data_fingerprint`: its name and the content digest
  of its images, labels and ground truth), the same for the same split on every machine;
* ``settings_key`` — :func:`settings_key`, a stable hash of the audit's settings dict (sorted JSON).

**Tables** (schema version :data:`SCHEMA_VERSION`, in ``meta``):

=================  ==============================================================================================
``meta``           ``key``, ``value``: ``schema_version``, ``created_at``, ``vlmfast_version``
``models``         ``model_key`` (PK), ``name``, ``path``, ``card`` (JSON), ``first_seen`` (Unix time); name, path and
                   card are the latest entry's, ``first_seen`` the first time the key was seen
``calibration``    ``model_key``, ``data_fp``, ``settings_key``, ``split``, ``metric``, ``value`` REAL (NULL for NaN);
``rationality``    primary key ``(model_key, data_fp, settings_key, split, metric)`` — one table per audit
``spurious``       (:data:`AUDIT_TABLES`)
``done``           ``model_key``, ``audit``, ``data_fp``, ``settings_key``, ``finished_at``, ``seconds``: a unit of work
                   whose rows are all committed (primary key: the four keys)
``settings``       ``settings_key`` (PK), ``audit``, ``settings`` (JSON): what each key stands for
``datasets``       ``data_fp`` (PK), ``split``, ``info`` (JSON): what each fingerprint stands for
``failures``       ``id``, ``model_key`` (NULL when the model could not even be hashed), ``name``, ``path``,
                   ``audit`` (``"load"`` when the model did not load), ``error``, ``at`` — a log, newest last
``artifacts``      (version 2) ``model_key``, ``audit``, ``data_fp``, ``settings_key``, ``split``, ``name``,
                   ``kind`` (``"json"`` or ``"safetensors"``: tensors, never a pickle), ``data`` BLOB: what the report
                   draws from (a unit's reliability bins, heatmaps of a few images, a spurious cluster's regions);
                   written in the unit's transaction, replaced with its rows
=================  ==============================================================================================

**Atomicity.** :meth:`AuditStore.write` inserts every row of a unit *and* its ``done`` marker in one transaction:
an exception (or a kill) anywhere in the middle leaves no row of that unit behind, so ``done`` never lies and a
restarted run recomputes exactly the units that were not committed. Several processes may share a file (WAL
readers never block the writer; writers wait up to ``timeout`` seconds for each other).

**Versions.** The schema is built by table-driven migrations (:data:`MIGRATIONS`: version -> SQL statements, each
version's statements applied in one transaction). A file written by a newer vlmfast (``schema_version`` above
:data:`SCHEMA_VERSION`) is refused with :class:`SchemaVersionError` instead of being misread.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["ARTIFACT_KINDS", "AUDIT_TABLES", "MIGRATIONS", "SCHEMA_VERSION", "AuditStore", "SchemaVersionError",
           "data_fingerprint", "settings_key"]

#: The audits that have a results table (one table each, named like the audit).
AUDIT_TABLES = ("calibration", "rationality", "spurious")

SCHEMA_VERSION = 2

#: The kinds of an artifact's ``data``.
ARTIFACT_KINDS = ("json", "safetensors")


def _results_table(name: str) -> str:
    return (f"CREATE TABLE {name} (model_key TEXT NOT NULL, data_fp TEXT NOT NULL, settings_key TEXT NOT NULL, "
            "split TEXT NOT NULL, metric TEXT NOT NULL, value REAL, "
            "PRIMARY KEY (model_key, data_fp, settings_key, split, metric))")


#: schema version -> the statements that take a store from the version before to it (applied in order, each
#: version in one transaction together with its ``schema_version`` update).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE models (model_key TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, "
        "card TEXT NOT NULL, first_seen REAL NOT NULL)",
        *(_results_table(a) for a in AUDIT_TABLES),
        "CREATE TABLE done (model_key TEXT NOT NULL, audit TEXT NOT NULL, data_fp TEXT NOT NULL, "
        "settings_key TEXT NOT NULL, finished_at REAL NOT NULL, seconds REAL, "
        "PRIMARY KEY (model_key, audit, data_fp, settings_key))",
        "CREATE TABLE settings (settings_key TEXT PRIMARY KEY, audit TEXT NOT NULL, settings TEXT NOT NULL)",
        "CREATE TABLE datasets (data_fp TEXT PRIMARY KEY, split TEXT NOT NULL, info TEXT NOT NULL)",
        "CREATE TABLE failures (id INTEGER PRIMARY KEY AUTOINCREMENT, model_key TEXT, name TEXT, path TEXT, "
        "audit TEXT NOT NULL, error TEXT NOT NULL, at REAL NOT NULL)",
    ),
    2: (
        "CREATE TABLE artifacts (model_key TEXT NOT NULL, audit TEXT NOT NULL, data_fp TEXT NOT NULL, "
        "settings_key TEXT NOT NULL, split TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL, "
        "PRIMARY KEY (model_key, audit, data_fp, settings_key, name))",
    ),
}


class SchemaVersionError(ValueError):
    """The store was written by a newer vlmfast (its schema version is above the one this version knows)."""


def _canonical(obj: Any, where: str) -> Any:
    """``obj`` as plain JSON values (tuples -> lists), TypeError naming ``where`` for anything else; non-finite
    floats are refused (they have no stable JSON form)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: expected finite numbers, got {obj!r}")
        return obj
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: expected str keys, got {type(k).__name__} key {k!r}")
            out[k] = _canonical(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: expected JSON values (None, bool, int, float, str, list, dict), got "
                    f"{type(obj).__name__}")


def settings_key(settings: Mapping[str, Any]) -> str:
    """A stable key of an audit's settings: the SHA-256 (first 16 hex digits) of their sorted, compact JSON. Equal
    dicts give equal keys whatever their key order; ``(1, 2)`` and ``[1, 2]`` are the same; ``1`` and ``1.0`` are
    not (JSON keeps them apart)."""
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings: expected a dict, got {type(settings).__name__}")
    text = json.dumps(_canonical(dict(settings), "settings"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: The per-sample ground truth that a split's fingerprint covers (whichever of them the dataset has).
_FP_FIELDS = ("images", "labels", "boxes", "digit_masks", "region_boxes", "region_labels", "has_spurious")


def data_fingerprint(data: Any, split: str = "") -> str:
    """The fingerprint of an evaluation split (first 16 hex digits of a SHA-256), the same for the same split on
    every machine and in every run.

    A streamed source (:class:`vlmfast.data.ImageFolderStream`, or a DataLoader reading one in order and whole) is
    keyed by :func:`vlmfast.data.stream.fingerprint`; an in-memory dataset by
    :func:`vlmfast._cache.content_digest` of its images, labels and ground truth (boxes, masks, region labels —
    whichever it has) and its class names. ``split``, the name the rows are stored under, is part of the key."""
    from vlmfast._cache import content_digest, stable_hash
    from vlmfast.data.stream import fingerprint

    if not isinstance(split, str):
        raise TypeError(f"split: expected a str, got {type(split).__name__}")
    fp = fingerprint(data)
    if fp is None:
        import torch

        images = getattr(data, "images", data)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"data: expected a dataset with an .images tensor or a stream with a fingerprint(), got "
                            f"{type(data).__name__}")
        arrays = {name: getattr(data, name) for name in _FP_FIELDS
                  if isinstance(getattr(data, name, None), torch.Tensor)}
        arrays["images"] = images
        fp = content_digest(arrays, {"classnames": list(getattr(data, "classnames", None) or [])})
    return stable_hash({"split": split, "data": fp}, 16)


def _value(v: Any, where: str) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        v = v.item()
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{where}: expected a number, got {type(v).__name__} ({v!r:.60})")
    v = float(v)
    return None if math.isnan(v) else v


class AuditStore:
    """The results of a fleet's audits in the SQLite file ``path`` (created with its folder if absent; see the
    module docs for the tables and keys). Use as a context manager or call :meth:`close`.

    ``timeout``: seconds a writer waits for another process's write lock. Raises :class:`SchemaVersionError` for
    a file of a newer schema, ``ValueError`` for a file that is not a vlmfast store.

    ``readonly=True`` (the report): the file must exist (``FileNotFoundError`` otherwise; nothing is created) and
    is opened read-only — no migration, no ``meta`` update, every write raises; a store of an older schema is
    refused with a ValueError saying to upgrade it with a writing run (``vlmfast audit``).
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 30.0, readonly: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a file path, got {type(path).__name__}")
        self.path = Path(path)
        self.readonly = bool(readonly)
        if self.path.is_dir():
            raise ValueError(f"path: expected a SQLite file, got the folder {str(self.path)!r}")
        if self.readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no such audit store")
            try:
                uri = self.path.resolve().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
                self._check_readable()
            except sqlite3.DatabaseError as e:
                self._close_quietly()
                raise ValueError(f"{self.path}: not a vlmfast audit store ({e})") from e
            except BaseException:
                self._close_quietly()
                raise
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise ValueError(f"{self.path}: not a vlmfast audit store ({e})") from e
        except BaseException:
            self._close_quietly()
            raise

    # ------------------------------------------------------------------ lifecycle
    def _close_quietly(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._close_quietly()

    def __enter__(self) -> "AuditStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditStore({str(self.path)!r})"

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"{self.path}: the store is closed")
        return self._db

    def _tx(self):
        if self.readonly:
            raise ValueError(f"{self.path}: the store was opened read-only (readonly=True); cannot write")
        return _Transaction(self.db)

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int:
        """The file's schema version (0 for a new, empty file)."""
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            if self.db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
                raise ValueError(f"{self.path}: a SQLite file without vlmfast's meta table (not an audit store)")
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        try:
            return int(row[0]) if row else 0
        except ValueError as e:
            raise ValueError(f"{self.path}: meta.schema_version is {row[0]!r}, expected an integer") from e

    def _check_readable(self) -> None:
        """A read-only store must be at exactly this version's schema (it cannot be migrated in place)."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path}: schema version {current} was written by a newer vlmfast; this one reads versions "
                f"up to {SCHEMA_VERSION} (upgrade vlmfast)")
        if current == 0:
            raise ValueError(f"{self.path}: an empty SQLite file, not an audit store (no tables)")
        if current < SCHEMA_VERSION:
            raise ValueError(f"{self.path}: schema version {current} is older than {SCHEMA_VERSION}; open it once "
                             "for writing (e.g. `vlmfast audit --db` on it) to upgrade it")

    def _migrate(self) -> None:
        from vlmfast._version import __version__

        with self._tx():  # BEGIN IMMEDIATE: two processes opening a new file do not both create the tables
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path}: schema version {current} was written by a newer vlmfast; this one reads versions "
                    f"up to {SCHEMA_VERSION} (upgrade vlmfast, or write to another --db)")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[version]:
                    self.db.execute(stmt)
                self._set_meta("schema_version", str(version))
            if current == 0:
                self._set_meta("created_at", repr(time.time()))
            self._set_meta("vlmfast_version", __version__)

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                        "excluded.value", (key, value))

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    # ------------------------------------------------------------------ models
    def add_model(self, model_key: str, name: str, path: str, card: Mapping[str, Any] | None = None) -> None:
        """Record (or update) a model: its latest ``name``, ``path`` and ``card``; ``first_seen`` is kept."""
        _check_key("model_key", model_key)
        card_json = json.dumps(_canonical(dict(card or {}), "card"), sort_keys=True)
        with self._tx():
            self.db.execute(
                "INSERT INTO models (model_key, name, path, card, first_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(model_key) DO UPDATE SET name = excluded.name, path = excluded.path, "
                "card = excluded.card", (model_key, str(name), str(path), card_json, time.time()))

    def models(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT model_key, name, path, card, first_seen FROM models ORDER BY first_seen, "
                               "model_key").fetchall()
        return [{"model_key": k, "name": n, "path": p, "card": json.loads(c), "first_seen": t}
                for k, n, p, c, t in rows]

    # ------------------------------------------------------------------ results
    def has(self, model_key: str, audit: str, data_fp: str, settings: Mapping[str, Any] | str) -> bool:
        """True when the unit ``(model_key, audit, data_fp, settings)`` is committed (its ``done`` marker exists).
        ``settings``: the settings dict or its :func:`settings_key`."""
        _check_audit(audit)
        skey = settings if isinstance(settings, str) else settings_key(settings)
        row = self.db.execute("SELECT 1 FROM done WHERE model_key = ? AND audit = ? AND data_fp = ? AND "
                              "settings_key = ?", (model_key, audit, data_fp, skey)).fetchone()
        return row is not None

    def write(self, model_key: str, audit: str, data_fp: str, settings: Mapping[str, Any],
              rows: Iterable[tuple[str, str, Any]], *, seconds: float | None = None,
              split_info: Mapping[str, Mapping[str, Any]] | None = None,
              artifacts: Iterable[tuple[str, str, str, bytes]] | None = None) -> int:
        """Commit one unit of work: every ``(split, metric, value)`` of ``rows`` into the audit's table and the
        ``done`` marker, in ONE transaction (an exception while rows are read or written rolls all of it back).

        Rows of the same unit already in the table are replaced (``--force``). ``value``: a number (bools, numpy
        and torch scalars accepted); NaN is stored as NULL. ``seconds``: the compute time recorded in ``done``.
        ``split_info``: split name -> JSON description, recorded in ``datasets`` under ``data_fp``. ``artifacts``:
        ``(split, name, kind, data bytes)`` of the unit (``kind`` in :data:`ARTIFACT_KINDS`), replacing the unit's
        earlier ones in the same transaction. Returns the number of rows written."""
        _check_key("model_key", model_key)
        _check_key("data_fp", data_fp)
        _check_audit(audit)
        skey = settings_key(settings)
        settings_json = json.dumps(_canonical(dict(settings), "settings"), sort_keys=True)
        n = 0
        with self._tx():
            self.db.execute(f"DELETE FROM {audit} WHERE model_key = ? AND data_fp = ? AND settings_key = ?",
                            (model_key, data_fp, skey))
            for i, row in enumerate(rows):
                if not isinstance(row, (tuple, list)) or len(row) != 3:
                    raise ValueError(f"rows[{i}]: expected (split, metric, value), got {row!r:.80}")
                split, metric, value = row
                if not isinstance(split, str) or not isinstance(metric, str) or not metric:
                    raise TypeError(f"rows[{i}]: expected str split and non-empty str metric, got {split!r}, "
                                    f"{metric!r}")
                self.db.execute(f"INSERT OR REPLACE INTO {audit} (model_key, data_fp, settings_key, split, metric, "
                                "value) VALUES (?, ?, ?, ?, ?, ?)",
                                (model_key, data_fp, skey, split, metric, _value(value, f"rows[{i}] ({metric})")))
                n += 1
            self.db.execute("DELETE FROM artifacts WHERE model_key = ? AND audit = ? AND data_fp = ? AND "
                            "settings_key = ?", (model_key, audit, data_fp, skey))
            for i, art in enumerate(artifacts or ()):
                if not isinstance(art, (tuple, list)) or len(art) != 4:
                    raise ValueError(f"artifacts[{i}]: expected (split, name, kind, bytes), got {art!r:.80}")
                split, name, kind, data = art
                if kind not in ARTIFACT_KINDS or not isinstance(data, (bytes, bytearray)) or not name:
                    raise ValueError(f"artifacts[{i}]: expected a name, a kind in {ARTIFACT_KINDS} and bytes, got "
                                     f"{name!r}, {kind!r}, {type(data).__name__}")
                self.db.execute("INSERT OR REPLACE INTO artifacts (model_key, audit, data_fp, settings_key, split, "
                                "name, kind, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (model_key, audit, data_fp, skey, str(split), str(name), kind, bytes(data)))
            self.db.execute("INSERT OR IGNORE INTO settings (settings_key, audit, settings) VALUES (?, ?, ?)",
                            (skey, audit, settings_json))
            for split, info in (split_info or {}).items():
                self.db.execute("INSERT OR REPLACE INTO datasets (data_fp, split, info) VALUES (?, ?, ?)",
                                (data_fp, str(split), json.dumps(_canonical(dict(info), "split_info"),
                                                                 sort_keys=True)))
            self.db.execute("INSERT OR REPLACE INTO done (model_key, audit, data_fp, settings_key, finished_at, "
                            "seconds) VALUES (?, ?, ?, ?, ?, ?)",
                            (model_key, audit, data_fp, skey, time.time(),
                             None if seconds is None else float(seconds)))
        return n

    def record_failure(self, model_key: str | None, audit: str, error: BaseException | str, *, name: str = "",
                       path: str = "") -> None:
        """Log a failure: ``audit`` is the audit that failed or ``"load"`` (the model could not be hashed or loaded;
        ``model_key`` None when it could not even be hashed); ``error`` an exception (``Type: message``) or text."""
        if isinstance(error, BaseException):
            text = f"{type(error).__name__}: {' '.join(str(error).split())}"
        else:
            text = str(error)
        with self._tx():
            self.db.execute("INSERT INTO failures (model_key, name, path, audit, error, at) VALUES (?, ?, ?, ?, ?, ?)",
                            (model_key, str(name), str(path), str(audit), text, time.time()))

    def failures(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT model_key, name, path, audit, error, at FROM failures ORDER BY id").fetchall()
        return [dict(zip(("model_key", "name", "path", "audit", "error", "at"), r)) for r in rows]

    def done(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT model_key, audit, data_fp, settings_key, finished_at, seconds FROM done "
                               "ORDER BY model_key, audit, data_fp, settings_key").fetchall()
        return [dict(zip(("model_key", "audit", "data_fp", "settings_key", "finished_at", "seconds"), r))
                for r in rows]

    def settings(self, key: str) -> dict[str, Any] | None:
        """The settings dict a :func:`settings_key` stands for (None if unknown)."""
        row = self.db.execute("SELECT settings FROM settings WHERE settings_key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def results(self, audit: str) -> list[dict[str, Any]]:
        """Every row of ``audit``'s table as dicts ``model_key, name, data_fp, settings_key, split, metric, value``
        (NULL back as NaN; ``name`` from ``models``, "" when the model was never recorded), in a fixed order."""
        _check_audit(audit)
        rows = self.db.execute(
            f"SELECT r.model_key, coalesce(m.name, ''), r.data_fp, r.settings_key, r.split, r.metric, r.value "
            f"FROM {audit} r LEFT JOIN models m ON m.model_key = r.model_key "
            "ORDER BY r.model_key, r.data_fp, r.settings_key, r.split, r.metric").fetchall()
        keys = ("model_key", "name", "data_fp", "settings_key", "split", "metric", "value")
        return [dict(zip(keys, (*r[:6], float("nan") if r[6] is None else float(r[6])))) for r in rows]

    def artifacts(self, audit: str | None = None, *, with_data: bool = True) -> list[dict[str, Any]]:
        """Every artifact (of ``audit``, or all) as dicts ``model_key, audit, data_fp, settings_key, split, name,
        kind`` and, with ``with_data``, ``data`` (bytes), in a fixed order."""
        if audit is not None:
            _check_audit(audit)
        cols = "model_key, audit, data_fp, settings_key, split, name, kind" + (", data" if with_data else "")
        q = f"SELECT {cols} FROM artifacts" + (" WHERE audit = ?" if audit else "") + \
            " ORDER BY model_key, audit, data_fp, settings_key, split, name"
        keys = cols.split(", ")
        return [dict(zip(keys, r)) for r in self.db.execute(q, (audit,) if audit else ()).fetchall()]

    def export_csv(self, path: str | os.PathLike) -> Path:
        """Every audit's rows in one CSV (``audit, model_key, name, data_fp, settings_key, split, metric, value``;
        NaN as an empty cell), written atomically; creates the folder. Returns the path."""
        from vlmfast._cache import atomic_target

        out = Path(path)
        if out.is_dir():
            raise ValueError(f"path: expected a file path, got the folder {str(out)!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(out) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["audit", "model_key", "name", "data_fp", "settings_key", "split", "metric", "value"])
                for audit in AUDIT_TABLES:
                    for r in self.results(audit):
                        v = r["value"]
                        w.writerow([audit, r["model_key"], r["name"], r["data_fp"], r["settings_key"], r["split"],
                                    r["metric"], "" if math.isnan(v) else repr(v)])
        return out


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception, KeyboardInterrupt included)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _check_key(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name}: expected a non-empty str, got {value!r:.60}")


def _check_audit(audit: Any) -> None:
    if audit not in AUDIT_TABLES:
        raise ValueError(f"audit: expected one of {AUDIT_TABLES}, got {audit!r}")
