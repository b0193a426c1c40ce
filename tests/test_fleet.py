"""The fleet runner's core: the SQLite results store, the manifest, ``audit_fleet`` and ``vlmfast audit --manifest``.

Tiny random-init models (``vlmfast-tiny-rn`` / ``vlmfast-tiny-vit``) saved as vlmfast checkpoints, 40-image splits
built once per module; the spurious sweep is cut to k in [4, 8) where the test does not need the default.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import threading

import pytest
import torch

from vlmfast.fleet import (AUDITS, AuditStore, ManifestEntry, SchemaVersionError, audit_fleet, build_splits,
                           data_fingerprint, load_manifest, model_key, settings_key, write_manifest)
from vlmfast.fleet import runner as fleet_runner
from vlmfast.fleet.store import SCHEMA_VERSION

ALL = ("calibration", "rationality", "spurious")
FAST = {"spurious": {"ks": [4, 8]}}
N = 40


def _save(model, path, card=None):
    from vlmfast.models import save_checkpoint

    return save_checkpoint(model, path, card or {"method": "random"})


def _tiny(config, seed):
    from vlmfast.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(config, device="cpu").eval()


def _classifier_folder(model, out):
    """A `vlmfast finetune`-style folder (model + head) of an FT-like classifier on ``model``."""
    from vlmfast.data import CAPTION_TEMPLATES, CLASSNAMES
    from vlmfast.tuning.robust import RobustResult, zero_shot_classifier

    clf = zero_shot_classifier(model, list(CLASSNAMES), list(CAPTION_TEMPLATES))
    with torch.no_grad():
        clf.head.bias.copy_(torch.linspace(-0.5, 0.5, clf.head.bias.numel()))
    res = RobustResult("ft", model, clf, clf, list(CLASSNAMES), list(CAPTION_TEMPLATES), {"method": "ft"})
    return res.save(out)


@pytest.fixture(scope="module")
def splits():
    return build_splits(("id", "noise-3"), n=N, seed=0)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Checkpoints shared by the tests (never modified): rn, vit and an FT-style classifier folder."""
    root = tmp_path_factory.mktemp("zoo")
    rn, vit = _tiny("vlmfast-tiny-rn", 1), _tiny("vlmfast-tiny-vit", 2)
    _save(rn, root / "ckpt" / "rn")
    _save(vit, root / "ckpt" / "vit")
    _classifier_folder(_tiny("vlmfast-tiny-rn", 3), root / "ft" / "model")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, zoo, splits):
    """An uninterrupted run of every audit over rn, vit and ft: (store path, summary); read only."""
    db = tmp_path_factory.mktemp("ref") / "ref.sqlite"
    return db, audit_fleet(_entries(zoo, ("rn", "vit", "ft")), ALL, db, splits, settings=FAST, device="cpu")


def _entries(zoo, names=("rn", "vit")):
    table = {"rn": dict(name="rn", path="ckpt/rn", kind="clip", method="random", seed=1),
             "vit": dict(name="vit", path="ckpt/vit.safetensors", kind="clip", seed=2),
             "ft": dict(name="ft", path="ft", kind="classifier", method="ft", seed=3)}
    return [ManifestEntry(**table[n], root=zoo) for n in names]


def _rows(db):
    """Every stored result, NaN as None, in a fixed order (no timing fields)."""
    with AuditStore(db) as st:
        return {a: [{**r, "value": None if math.isnan(r["value"]) else r["value"]} for r in st.results(a)]
                for a in ALL}


def _counting(monkeypatch, calls, fail_at=None, exc=None):
    """Wrap every registered audit so that calls[...] counts (audit, split) calls; raise ``exc`` on call number
    ``fail_at`` (1-based, over all audits)."""
    for name, spec in list(AUDITS.items()):
        def fn(target, split, settings, options=None, _spec=spec, _name=name):
            calls.append((_name, split.name))
            if fail_at is not None and len(calls) == fail_at:
                raise exc
            return _spec.fn(target, split, settings, options)

        monkeypatch.setitem(AUDITS, name, dataclasses.replace(spec, fn=fn))


# ------------------------------------------------------------------------------------------------------ store


def test_settings_key_and_data_fingerprint(splits):
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": (1, 2), "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})
    assert settings_key({"a": 1}) != settings_key({"a": 1.5})
    with pytest.raises(TypeError, match="settings"):
        settings_key([1])
    with pytest.raises(ValueError, match="finite"):
        settings_key({"a": float("nan")})
    again = build_splits(("id",), n=N, seed=0)["id"]
    assert again.fingerprint == splits["id"].fingerprint  # the same split always gives the same key
    assert splits["id"].fingerprint != splits["noise-3"].fingerprint
    assert build_splits(("id",), n=N, seed=1)["id"].fingerprint != splits["id"].fingerprint
    assert data_fingerprint(splits["id"].data, "other-name") != splits["id"].fingerprint
    with pytest.raises(TypeError, match="data"):
        data_fingerprint(object())


def test_store_write_is_one_transaction(tmp_path):
    settings = {"n_bins": 15}
    with AuditStore(tmp_path / "a.sqlite") as st:
        assert st.meta()["schema_version"] == str(SCHEMA_VERSION)
        assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        def rows_then_crash():
            yield ("id", "ece", 0.1)
            yield ("id", "nll", 1.0)
            raise RuntimeError("killed mid-write")

        with pytest.raises(RuntimeError, match="mid-write"):
            st.write("k1", "calibration", "fp1", settings, rows_then_crash())
        assert not st.has("k1", "calibration", "fp1", settings)
        assert st.results("calibration") == []
        with pytest.raises(TypeError, match="rows\\[1\\]"):  # a bad value in the middle: nothing written either
            st.write("k1", "calibration", "fp1", settings, [("id", "ece", 0.1), ("id", "nll", "x")])
        assert st.results("calibration") == [] and st.done() == []

        assert st.write("k1", "calibration", "fp1", settings, [("id", "ece", 0.1), ("id", "nll", float("nan")),
                                                                ("id", "n", torch.tensor(40))], seconds=0.5) == 3
        assert st.has("k1", "calibration", "fp1", settings)
        assert st.has("k1", "calibration", "fp1", settings_key(settings))
        assert not st.has("k1", "calibration", "fp1", {"n_bins": 10})
        assert not st.has("k1", "rationality", "fp1", settings)
        raw = st.db.execute("SELECT metric, value FROM calibration ORDER BY metric").fetchall()
        assert raw == [("ece", 0.1), ("n", 40.0), ("nll", None)]  # NaN is stored as NULL
        res = {r["metric"]: r["value"] for r in st.results("calibration")}
        assert res["ece"] == 0.1 and math.isnan(res["nll"])
        assert st.settings(settings_key(settings)) == settings
        # rewriting a unit (force) replaces its rows
        st.write("k1", "calibration", "fp1", settings, [("id", "ece", 0.2)])
        assert [(r["metric"], r["value"]) for r in st.results("calibration")] == [("ece", 0.2)]
        with pytest.raises(ValueError, match="audit"):
            st.write("k1", "nope", "fp1", settings, [])
        st.record_failure(None, "load", FileNotFoundError("gone"), name="m", path="/x")
        assert st.failures()[0]["error"] == "FileNotFoundError: gone"
        out = st.export_csv(tmp_path / "out" / "r.csv")
    text = out.read_text().splitlines()
    assert text[0] == "audit,model_key,name,data_fp,settings_key,split,metric,value"
    assert text[1].startswith("calibration,k1,,fp1,") and text[1].endswith(",id,ece,0.2")


def test_store_refuses_newer_schema_and_foreign_files(tmp_path):
    db = tmp_path / "a.sqlite"
    AuditStore(db).close()
    AuditStore(db).close()  # reopening a current store is fine
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}.*newer vlmfast"):
        AuditStore(db)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not a vlmfast audit store"):
        AuditStore(junk)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="meta table"):
        AuditStore(other)


# --------------------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_paths(tmp_path, zoo):
    entries = _entries(zoo, ("rn", "vit", "ft")) + [ManifestEntry("zs", "base:vlmfast-tiny-vit", "base",
                                                                  method="zero-shot", tags=["a"], meta={"x": 1})]
    m = write_manifest(entries, zoo / "m.yaml")
    loaded = load_manifest(m)
    assert loaded == entries
    assert [e.resolved for e in loaded[:3]] == [zoo / "ckpt" / "rn", zoo / "ckpt" / "vit.safetensors", zoo / "ft"]
    assert "path: ckpt/rn\n" in m.read_text()  # written relative to the manifest's folder
    elsewhere = load_manifest(write_manifest(entries, tmp_path / "m.yaml"))  # outside it: absolute
    assert elsewhere[0].path == str(zoo / "ckpt" / "rn") and elsewhere[0].resolved == zoo / "ckpt" / "rn"
    assert loaded[3].config == "vlmfast-tiny-vit" and loaded[3].preset == "test"
    # a bare list is a manifest too; relative paths resolve against the manifest's folder
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.yaml").write_text("- {name: a, path: ../x/ck, kind: clip}\n")
    assert load_manifest(tmp_path / "sub" / "m.yaml")[0].resolved == tmp_path / "sub" / ".." / "x" / "ck"
    # keys: content, not names or paths
    key_rn, parts = model_key(loaded[0])
    assert set(parts) == {"model"} and len(key_rn) == 64
    assert model_key(ManifestEntry("other-name", str(zoo / "ckpt" / "rn.json"), "clip"))[0] == key_rn
    assert set(model_key(loaded[2])[1]) == {"model", "head"}
    assert model_key(ManifestEntry("ft-as-clip", "ft", "clip", root=zoo))[0] != model_key(loaded[2])[0]


def test_weights_digest_ignores_the_safetensors_header_order(tmp_path):
    import json

    from vlmfast.fleet.manifest import sha256_stream, weights_digest

    data = bytes(range(16))

    def write(name, header, payload=data):
        raw = json.dumps(header).encode()
        (tmp_path / name).write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
        return tmp_path / name

    t = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    a = write("a.safetensors", {"__metadata__": {"format": "x", "config": "y"}, "w": t})
    b = write("b.safetensors", {"w": t, "__metadata__": {"config": "y", "format": "x"}})
    c = write("c.safetensors", {"w": t, "__metadata__": {"config": "y", "format": "x"}}, data[::-1])
    assert a.read_bytes() != b.read_bytes()
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    junk = tmp_path / "j.safetensors"
    junk.write_bytes(b"\xff" * 40)
    assert weights_digest(junk) == sha256_stream(junk)


@pytest.mark.parametrize("text, match", [
    ("models: []", "at least one entry"),
    ("version: 9\nmodels: [{name: a, path: p, kind: clip}]", "version"),
    ("modles: []", "modles: unknown top-level key"),
    ("models: [{name: a, path: p}]", r"models\[0\] \('a'\): kind: missing"),
    ("models: [{name: a, path: p, kind: vit}]", r"models\[0\] \('a'\): kind: expected one of"),
    ("models: [{name: a, path: p, kind: clip, seed: -1}]", r"\('a'\): seed: expected an int >= 0"),
    ("models: [{name: a, path: p, kind: clip, sed: 1}]", r"\('a'\): sed: unknown field"),
    ("models: [{name: a, path: p, kind: clip}, {name: a, path: q, kind: clip}]", r"models\[1\] \('a'\): name: dup"),
    ("models: [{name: a, path: p, kind: base}]", r"\('a'\): path: expected 'base' or 'base:CONFIG'"),
    ("models: [{name: a, path: base, kind: clip}]", r"\('a'\): kind: expected 'base'"),
    ("models: [{name: a, path: p, kind: clip, preset: test}]", r"\('a'\): preset: only for kind 'base'"),
    ("models: [{name: '', path: p, kind: clip}]", r"models\[0\]: name: expected a non-empty str"),
    ("models: [{name: a, path: p, kind: clip, tags: x}]", r"tags: expected a list of str"),
    ("models: [3]", r"models\[0\]: expected a mapping"),
    ("models: [{name: a, path: p, kind: clip]", "not valid YAML"),
])
def test_manifest_validation_errors(tmp_path, text, match):
    m = tmp_path / "manifest.yaml"
    m.write_text(text + "\n")
    with pytest.raises(ValueError, match=match) as info:
        load_manifest(m)
    assert str(m) in str(info.value)


# ----------------------------------------------------------------------------------------------------- runner


def test_results_equal_the_metric_functions(zoo, splits, reference):
    """Every stored number equals a direct call of the audit's metric function on the same model and split."""
    from vlmfast.audit import heatmaps
    from vlmfast.audit.spurious import discover, precision_at_k
    from vlmfast.data import CAPTION_TEMPLATES, REGION_SPURIOUS
    from vlmfast.metrics import calibration, masks_from_boxes, rationality
    from vlmfast.models import load_checkpoint
    from vlmfast.tuning.robust import load_robust, predict, zero_shot_classifier

    db, s = reference
    assert (s.done, s.skipped, s.failed, s.computed) == (3, 0, [], 3 * 5)
    got = {}
    with AuditStore(db) as st:
        names = {m["model_key"]: m["name"] for m in st.models()}
        for a in ALL:
            for r in st.results(a):
                got[(names[r["model_key"]], a, r["split"], r["metric"])] = r["value"]

    def same(key, expected):
        v = got[key]
        assert (math.isnan(v) and math.isnan(expected)) or v == pytest.approx(expected, rel=1e-6, abs=1e-9), key

    rn, _ = load_checkpoint(zoo / "ckpt" / "rn", device="cpu")
    _, ft_clf, _ = load_robust(zoo / "ft" / "model", device="cpu")
    id_data = splits["id"].data
    for name, clf in (("rn", zero_shot_classifier(rn, id_data.classnames, list(CAPTION_TEMPLATES))),
                      ("ft", ft_clf)):
        for sp in ("id", "noise-3"):
            data = splits[sp].data
            logits, _ = predict(clf, data)
            r = calibration(logits, data.labels, n_bins=15, per_batch=512)
            for m in ("accuracy", "confidence", "ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier",
                      "ece_per_batch"):
                same((name, "calibration", sp, m), float(getattr(r, m)))
            assert got[(name, "calibration", sp, "n")] == N
    for name, target in (("rn", rn), ("ft", ft_clf)):
        data = splits["noise-3"].data
        h = heatmaps(target, data.images, data.labels, classnames=list(data.classnames))
        r = rationality(h.maps, masks_from_boxes(data.boxes.float(), (56, 56)), h.correct)
        for m, v in r.as_dict().items():
            if m != "threshold":
                same((name, "rationality", "noise-3", m), float(v))
        same((name, "rationality", "noise-3", "accuracy"), float(h.correct.float().mean()))
    res = discover(rn, id_data, list(id_data.classnames), ks=range(4, 8), seed=0)
    truth = (id_data.region_labels == REGION_SPURIOUS).reshape(-1).numpy()
    same(("rn", "spurious", "id", "k"), res.k)
    same(("rn", "spurious", "id", "silhouette"), res.silhouette)
    same(("rn", "spurious", "id", "found"), float(res.found))
    same(("rn", "spurious", "id", "precision_at_10"), precision_at_k(res, truth, 10) if res.found else float("nan"))
    same(("rn", "spurious", "id", "top_gap"), res.top.gap if res.found else float("nan"))
    assert ("rn", "spurious", "noise-3", "k") not in got  # the spurious audit runs on the test composites only


def test_second_run_recomputes_and_loads_nothing(tmp_path, zoo, splits, monkeypatch):
    db = tmp_path / "a.sqlite"
    entries = _entries(zoo, ("rn", "vit"))
    calls, loads = [], []
    _counting(monkeypatch, calls)
    real_load = fleet_runner.load_entry
    threads = []

    def counted_load(e, **kw):
        loads.append(e.name)
        threads.append(threading.current_thread().name)
        return real_load(e, **kw)

    monkeypatch.setattr(fleet_runner, "load_entry", counted_load)
    reports = []
    s1 = audit_fleet(entries, ALL, db, splits, settings=FAST, progress=reports.append)
    assert len(calls) == 10 and loads == ["rn", "vit"] and s1.computed == 10
    assert threads[1].startswith("vlmfast-fleet-load")  # the second model loaded while the first computed
    assert [r.status for r in reports] == ["done", "done"]
    calls.clear(), loads.clear()
    manifest = write_manifest(entries, tmp_path / "manifest.yaml")  # a manifest path: the same entries and keys
    s2 = audit_fleet(manifest, ALL, db, splits, settings=FAST)
    assert calls == [] and loads == []  # nothing recomputed, nothing even loaded
    assert (s2.done, s2.skipped, s2.computed, s2.reused) == (0, 2, 0, 10)
    assert "2 models: 0 done, 2 skipped, 0 failed; 0 results computed, 10 reused" in s2.line()
    # force recomputes everything
    s3 = audit_fleet(entries, ["calibration"], db, splits, force=True, prefetch=False)
    assert (s3.done, s3.computed) == (2, 4) and len(calls) == 4


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so the runner does not record it but stops."""


@pytest.mark.parametrize("fail_at", [6, 3])  # after the first model (5 units each) / in the middle of it
def test_killed_run_resumes_to_the_same_store(tmp_path, zoo, splits, reference, monkeypatch, fail_at):
    entries = _entries(zoo, ("rn", "vit", "ft"))
    ref, _ = reference
    db = tmp_path / "a.sqlite"
    calls = []
    with monkeypatch.context() as mp:
        _counting(mp, calls, fail_at=fail_at, exc=_Killed())
        with pytest.raises(_Killed):
            audit_fleet(entries, ALL, db, splits, settings=FAST)
    committed = fail_at - 1
    with AuditStore(db) as st:
        assert len(st.done()) == committed and st.failures() == []
    calls.clear()
    _counting(monkeypatch, calls)
    s = audit_fleet(entries, ALL, db, splits, settings=FAST)
    assert len(calls) == 15 - committed  # only what was not committed
    assert s.reused == committed and s.computed == 15 - committed
    assert _rows(db) == _rows(ref)


def test_retrained_checkpoint_is_reaudited_unchanged_is_not(tmp_path, splits, monkeypatch):
    root = tmp_path / "runs"
    rn = _tiny("vlmfast-tiny-rn", 1)
    _save(rn, root / "rn")
    _save(_tiny("vlmfast-tiny-rn", 5), root / "other")
    entries = [ManifestEntry("rn", "rn", "clip", root=root), ManifestEntry("other", "other", "clip", root=root)]
    db = tmp_path / "a.sqlite"
    calls = []
    _counting(monkeypatch, calls)
    audit_fleet(entries, ["calibration"], db, splits)
    old_key = model_key(entries[0])[0]
    _save(rn, root / "rn")  # rewritten with identical weights: same key, nothing to do
    calls.clear()
    assert audit_fleet(entries, ["calibration"], db, splits).skipped == 2 and calls == []
    with torch.no_grad():  # "retrained"
        rn.logit_scale.add_(0.5)
    _save(rn, root / "rn")
    calls.clear()
    s = audit_fleet(entries, ["calibration"], db, splits)
    assert (s.done, s.skipped) == (1, 1) and sorted(calls) == [("calibration", "id"), ("calibration", "noise-3")]
    new_key = model_key(entries[0])[0]
    assert new_key != old_key
    with AuditStore(db) as st:
        keys = {r["model_key"] for r in st.results("calibration")}
        assert {old_key, new_key} <= keys  # the old model's results stay, under its own key
        assert {m["model_key"]: m["name"] for m in st.models()}[new_key] == "rn"


def test_changed_settings_or_split_reaudits(tmp_path, zoo, splits, monkeypatch):
    db = tmp_path / "a.sqlite"
    entries = _entries(zoo, ("rn",))
    calls = []
    _counting(monkeypatch, calls)
    audit_fleet(entries, ["calibration", "rationality"], db, {"id": splits["id"]})
    assert len(calls) == 2
    calls.clear()
    audit_fleet(entries, ["calibration", "rationality"], db, {"id": splits["id"]},
                settings={"calibration": {"n_bins": 10}})
    assert calls == [("calibration", "id")]  # only the audit whose settings changed
    calls.clear()
    audit_fleet(entries, ["calibration", "rationality"], db, splits)  # a new split: only it is computed
    assert sorted(calls) == [("calibration", "noise-3"), ("rationality", "noise-3")]
    calls.clear()
    audit_fleet(entries, ["calibration"], db, {"id": splits["noise-3"].data})  # the same split name, other data
    assert calls == [("calibration", "id")]
    with AuditStore(db) as st:
        n_rows = {(r["settings_key"], r["data_fp"]) for r in st.results("calibration") if r["metric"] == "n"}
        assert len(n_rows) == 4  # (15 bins, id), (10 bins, id), (15 bins, noise-3), (15 bins, other data as id)
    with pytest.raises(ValueError, match="unknown key 'bins'"):
        audit_fleet(entries, ["calibration"], db, splits, settings={"calibration": {"bins": 3}})
    with pytest.raises(ValueError, match="audits: expected names"):
        audit_fleet(entries, ["nope"], db, splits)


def test_failures_are_recorded_and_the_rest_finishes(tmp_path, zoo, splits, monkeypatch):
    from vlmfast.models import get_model_config

    root = tmp_path / "runs"
    rn = _tiny("vlmfast-tiny-rn", 1)
    _save(rn, root / "corrupt")
    w = root / "corrupt.safetensors"
    w.write_bytes(w.read_bytes()[:-100] + b"\0" * 100)  # damaged after writing: SHA-256 no longer matches
    _save(rn, root / "mismatch", {"config": "vlmfast-tiny-vit", "model_cfg": get_model_config("vlmfast-tiny-vit")})
    _save(rn, root / "good")
    entries = [ManifestEntry("corrupt", "corrupt", "clip", root=root),
               ManifestEntry("missing", "nowhere", "clip", root=root),
               ManifestEntry("mismatch", "mismatch", "clip", root=root),
               ManifestEntry("good", "good", "clip", root=root)]
    db = tmp_path / "a.sqlite"
    s = audit_fleet(entries, ["calibration"], db, splits)
    assert s.done == 1 and s.n_failed == 3
    assert [(n, a) for n, a, _ in s.failed] == [("corrupt", "load"), ("missing", "load"), ("mismatch", "load")]
    assert "SHA-256" in s.failed[0][2] and "no such file" in s.failed[1][2]
    assert "CheckpointError" in s.failed[2][2]
    assert "3 failed" in s.line() and "corrupt (load): CheckpointError" in s.line()
    with AuditStore(db) as st:
        fails = st.failures()
        assert [f["name"] for f in fails] == ["corrupt", "missing", "mismatch"]
        assert fails[1]["model_key"] is None and fails[0]["model_key"]  # a missing file cannot be hashed
        assert {m["name"] for m in st.models()} == {"corrupt", "mismatch", "good"}
        assert len(st.done()) == 2  # the good model's two splits
    # an audit that raises is recorded under its name; the model's other audits still run
    calls = []

    def broken(target, split, settings, options=None):
        calls.append(split.name)
        raise RuntimeError("boom")

    monkeypatch.setitem(AUDITS, "rationality", dataclasses.replace(AUDITS["rationality"], fn=broken))
    s = audit_fleet(entries[3:], ["calibration", "rationality"], db, splits)
    assert s.n_failed == 1 and s.failed[0][:2] == ("good", "rationality") and "RuntimeError: boom" in s.failed[0][2]
    assert s.reused == 2 and len(calls) == 2


def test_base_entries_are_keyed_by_their_weights(tmp_path, splits, monkeypatch):
    """A ``base`` entry goes through pretrain_base (here replaced by a random tiny model) and is keyed by its
    weights, so the same base is not re-audited."""
    from vlmfast.fleet import manifest as fleet_manifest

    made = []

    def fake_pretrain_base(config="vlmfast-tiny-rn", preset="default", device=None, progress=None):
        made.append((config, preset))
        return _tiny(config, 0), {"method": "clip-pretrain"}

    import vlmfast.models

    monkeypatch.setattr(vlmfast.models, "pretrain_base", fake_pretrain_base)
    entries = [ManifestEntry("zs", "base", "base", method="zero-shot")]
    db = tmp_path / "a.sqlite"
    assert audit_fleet(entries, ["calibration"], db, {"id": splits["id"]}).done == 1
    assert made == [("vlmfast-tiny-rn", "test")]
    assert audit_fleet(entries, ["calibration"], db, {"id": splits["id"]}).skipped == 1
    with pytest.raises(ValueError, match="loaded weights"):
        fleet_manifest.model_key(entries[0])


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, zoo, capsys):
    from vlmfast.cli import main

    runs = tmp_path / "runs"
    write_manifest(_entries(zoo, ("rn", "ft")), runs / "manifest.yaml")
    db = tmp_path / "out" / "audit.sqlite"
    argv = ["audit", "--manifest", str(runs / "manifest.yaml"), "--audits", "calibration,rationality,spurious",
            "--db", str(db), "--n", "20", "--splits", "id", "--no-progress", "--device", "cpu"]
    assert main(argv + ["--csv", str(tmp_path / "r.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rn: done (calibration/id, rationality/id, spurious/id in ")
    assert out[1].startswith("ft: done (")
    assert out[-1].startswith("summary: 2 models: 2 done, 0 skipped, 0 failed; 6 results computed, 0 reused")
    assert (tmp_path / "r.csv").read_text().count("\n") > 2 * (11 + 10 + 8)
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["rn: skipped (3 results already stored)", "ft: skipped (3 results already stored)", out[-1]]
    assert out[-1].startswith("summary: 2 models: 0 done, 2 skipped, 0 failed; 0 results computed, 6 reused")
    # a failing model: exit 1, the reason in the summary line, the others done
    bad = runs / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    (runs / "bad.json").write_text('{"config": "vlmfast-tiny-rn"}')
    write_manifest(_entries(zoo, ("rn",)) + [ManifestEntry("bad", str(bad), "clip")], runs / "manifest.yaml")
    assert main(argv[:4] + ["calibration"] + argv[5:]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert "1 skipped, 1 failed" in last and "bad (load): CheckpointError" in last


def test_cli_usage_errors(tmp_path, capsys):
    from vlmfast.cli import main

    def err(argv):
        rc = main(argv)
        e = capsys.readouterr().err
        assert rc == 2 and e.count("\n") == 1, (rc, e)
        return e

    assert "expected a subcommand {rationality,spurious} or --manifest" in err(["audit"])
    m = tmp_path / "m.yaml"
    m.write_text("models: [{name: a, path: p, kind: nope}]\n")
    assert "models[0] ('a'): kind: expected one of" in err(["audit", "--manifest", str(m)])
    m.write_text("models: [{name: a, path: p, kind: clip}]\n")
    assert "--audits: expected names from" in err(["audit", "--manifest", str(m), "--audits", "calibration,x"])
    assert "--n: expected an int >= 20" in err(["audit", "--manifest", str(m), "--audits", "spurious", "--n", "5"])
    assert "no such file" in err(["audit", "--manifest", str(tmp_path / "nope.yaml")])
    assert "without a subcommand" in err(["audit", "--manifest", str(m), "rationality", "--models", "base"])
    db = tmp_path / "new.sqlite"
    AuditStore(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    assert "newer vlmfast" in err(["audit", "--manifest", str(m), "--db", str(db)])


def test_ray_fleet_equals_the_in_process_run(tmp_path, zoo, splits, reference):
    """A local Ray cluster on loopback (2 CPUs, one task per model): the store's results equal the in-process
    run's; a second Ray run recomputes nothing."""
    ray = pytest.importorskip("ray")  # the [distributed] extra (installed by make test)
    from vlmfast.fleet import audit_fleet_ray

    db = tmp_path / "ray.sqlite"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        s = audit_fleet_ray(_entries(zoo, ("rn", "vit", "ft")), ALL, db, splits, settings=FAST, device="cpu")
        assert s.done == 3 and not s.failed, s.line()
        assert _rows(db) == _rows(reference[0])
        again = audit_fleet_ray(_entries(zoo, ("rn", "vit", "ft")), ALL, db, splits, settings=FAST, device="cpu")
        assert again.skipped == 3 and again.computed == 0
        # prompt heads on one backbone: grouped on the driver (CoCoOp as a task); the same rows as in-process
        from vlmfast.models import load_checkpoint

        model, _ = load_checkpoint(zoo / "ckpt" / "rn", device="cpu")
        heads = _learners(tmp_path / "heads", zoo / "ckpt" / "rn", model)[:4]
        r = audit_fleet_ray(heads, ["calibration"], tmp_path / "rh.sqlite", splits, device="cpu")
        i = audit_fleet(heads, ["calibration"], tmp_path / "ih.sqlite", splits, device="cpu")
        assert r.done == i.done == 4 and not r.failed and r.computed == 8
        a, b = ({(x["name"], x["split"], x["metric"]): x["value"] for x in _rows(d)["calibration"]}
                for d in (tmp_path / "rh.sqlite", tmp_path / "ih.sqlite"))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------- prompt heads


def _learners(root, backbone_path, model):
    """Prompt entries on one saved backbone: three CoOp/KgCoOp learners with different contexts (trained on the
    base half), a CoCoOp learner (never grouped) and a learner whose file is corrupt."""
    from vlmfast.data import CLASSNAMES
    from vlmfast.fleet import ManifestEntry
    from vlmfast.tuning.prompt import PromptLearner

    entries = []
    for i, method in enumerate(("coop", "coop", "kgcoop", "cocoop", "coop")):
        learner = PromptLearner(model, list(CLASSNAMES[:5]), method=method, n_ctx=2, seed=i)
        with torch.no_grad():
            learner.ctx.add_(0.3 * torch.randn_like(learner.ctx))
        learner.save(root / f"p{i}" / "learner")
        entries.append(ManifestEntry(f"p{i}", f"p{i}/learner", "prompt", method=method, backbone=str(backbone_path),
                                     root=root))
    (root / "p4" / "learner.safetensors").write_bytes(b"not a safetensors file")
    return entries


def test_grouped_prompt_heads_equal_the_one_by_one_path(tmp_path, zoo, splits):
    """Prompt learners sharing a backbone are audited as one group (backbone loaded and each split encoded once,
    every head in one calibration pass): the same rows as one by one, to float32 rounding; the corrupt learner
    fails alone; CoCoOp runs one by one either way."""
    from vlmfast.fleet.runner import prompt_groups
    from vlmfast.models import load_checkpoint

    model, _ = load_checkpoint(zoo / "ckpt" / "rn", device="cpu")
    entries = _learners(tmp_path, zoo / "ckpt" / "rn", model)
    assert list(prompt_groups(entries).values()) == [[0, 1, 2, 4]]
    dbs = {}
    for grouped in (True, False):
        dbs[grouped] = tmp_path / f"{grouped}.sqlite"
        s = audit_fleet(entries, ["calibration"], dbs[grouped], splits, device="cpu", group_prompts=grouped)
        assert s.done == 4 and s.computed == 4 * 2 and [f[:2] for f in s.failed] == [("p4", "load")]
    a, b = ({(r["name"], r["split"], r["metric"]): r["value"] for r in _rows(dbs[g])["calibration"]}
            for g in (True, False))
    assert a.keys() == b.keys() and len(a) == 4 * 2 * (12 + 7)  # 4 models x 2 splits x (metrics + base/new)
    for k in a:
        assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert {k[-1] for k in a} >= {"new_ece", "worst_group_accuracy", "H"}
    again = audit_fleet(entries, ["calibration"], dbs[True], splits, device="cpu")
    assert again.computed == 0 and again.skipped == 4 and again.n_failed == 1
    # a group whose backbone is missing: every member is recorded as failed, nothing is computed
    from dataclasses import replace

    gone = [replace(e, backbone=str(tmp_path / "missing")) for e in entries[:3]]
    s = audit_fleet(gone, ["calibration"], tmp_path / "gone.sqlite", splits, device="cpu")
    assert s.computed == 0 and [f[:2] for f in s.failed] == [(e.name, "load") for e in gone]


# ------------------------------------------------------------------------------------------------- artifacts


def test_artifacts_are_part_of_the_unit_and_a_v1_store_migrates(tmp_path):
    from vlmfast.fleet.store import MIGRATIONS

    s = {"n_bins": 15}
    with AuditStore(tmp_path / "a.sqlite") as st:
        st.write("k", "calibration", "fp", s, [("id", "ece", 0.1)], artifacts=[("id", "reliability", "json", b"{}")])
        assert [(a["name"], a["data"]) for a in st.artifacts("calibration")] == [("reliability", b"{}")]
        with pytest.raises(ValueError, match="artifacts\\[0\\]"):  # a bad artifact: the unit is not rewritten
            st.write("k", "calibration", "fp", s, [("id", "ece", 0.3)], artifacts=[("id", "x", "pickle", b"")])
        assert [r["value"] for r in st.results("calibration")] == [0.1] and len(st.artifacts()) == 1
        st.write("k", "calibration", "fp", s, [("id", "ece", 0.2)])  # rewriting the unit replaces its artifacts
        assert st.artifacts() == []
    # a store written at schema version 1 (no artifacts table) is migrated on open, its rows kept
    old = tmp_path / "v1.sqlite"
    con = sqlite3.connect(old)
    for stmt in MIGRATIONS[1]:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO calibration VALUES ('k', 'fp', 'sk', 'id', 'ece', 0.5)")
    con.commit()
    con.close()
    with AuditStore(old) as st:
        assert st.schema_version() == SCHEMA_VERSION == 2 and st.artifacts() == []
        assert [r["value"] for r in st.results("calibration")] == [0.5]


def test_reference_run_artifacts_equal_the_audits(zoo, splits, reference):
    """Each unit's artifacts: the reliability bins of calibration(), the first heatmaps and masks of the split, the
    top cluster's regions (when one was found); none when audited with artifacts=False."""
    import json

    from safetensors.torch import load

    from vlmfast.audit import heatmaps
    from vlmfast.data import CAPTION_TEMPLATES
    from vlmfast.fleet.runner import N_ARTIFACT_IMAGES
    from vlmfast.metrics import calibration, masks_from_boxes
    from vlmfast.models import load_checkpoint
    from vlmfast.tuning.robust import predict, zero_shot_classifier

    db, _ = reference
    with AuditStore(db) as st:
        names = {m["model_key"]: m["name"] for m in st.models()}
        arts = {(names[a["model_key"]], a["audit"], a["split"], a["name"]): a for a in st.artifacts()}
    for name in ("rn", "vit", "ft"):
        for sp in ("id", "noise-3"):
            assert (name, "calibration", sp, "reliability") in arts and (name, "rationality", sp, "heatmaps") in arts
    rn, _ = load_checkpoint(zoo / "ckpt" / "rn", device="cpu")
    data = splits["noise-3"].data
    logits, _ = predict(zero_shot_classifier(rn, data.classnames, list(CAPTION_TEMPLATES)), data)
    r = calibration(logits, data.labels, n_bins=15)
    rel = json.loads(arts[("rn", "calibration", "noise-3", "reliability")]["data"])
    assert rel["bin_count"] == r.bin_count.tolist() and rel["n_bins"] == 15
    acc = [float("nan") if v is None else v for v in rel["bin_accuracy"]]
    assert torch.allclose(torch.tensor(acc, dtype=torch.float64), r.bin_accuracy.double(), equal_nan=True)
    t = load(arts[("rn", "rationality", "noise-3", "heatmaps")]["data"])
    h = heatmaps(rn, data.images, data.labels, classnames=list(data.classnames))
    k = N_ARTIFACT_IMAGES
    assert torch.allclose(t["maps"].float(), h.maps[:k].float(), atol=1e-3)
    assert torch.equal(t["masks"].bool(), masks_from_boxes(data.boxes.float(), (56, 56))[:k].bool())
    assert torch.equal(t["images"], torch.as_tensor(data.images[:k]))
    assert t["labels"].tolist() == data.labels[:k].tolist()
    for (name, audit, sp, art), a in arts.items():
        if art == "top_cluster":
            g = load(a["data"])
            assert audit == "spurious" and g["images"].shape[0] == g["boxes"].shape[0] >= 1


def test_no_artifacts_option(tmp_path, zoo, splits):
    db = tmp_path / "a.sqlite"
    s = audit_fleet(_entries(zoo, ("rn",)), ["calibration"], db, splits, device="cpu", artifacts=False)
    assert s.computed == 2
    with AuditStore(db) as st:
        assert st.artifacts() == [] and len(st.results("calibration")) > 0


# ------------------------------------------------------------------------------------------------- streaming


def test_streamed_folder_split_is_never_decoded_whole(tmp_path, zoo, splits, monkeypatch):
    """A ``folder:CSV`` split streams: calibration reads it batch by batch (equal to the same folder loaded into
    memory), it is never materialised, and the in-memory-only audits do not apply to it."""
    from PIL import Image

    from vlmfast.data import CLASSNAMES, ImageFolderStream, image_folder
    from vlmfast.fleet.runner import build_split

    data = splits["id"].data
    lines = ["path,label"]
    for i in range(len(data)):
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
        lines.append(f"{i:03d}.png,{CLASSNAMES[int(data.labels[i])]}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    memory = image_folder(tmp_path, csv)
    name = f"folder:{csv}"
    assert isinstance(build_split(name, 1, 0), ImageFolderStream)

    def no(self):
        raise AssertionError("the stream was loaded into memory")

    monkeypatch.setattr(ImageFolderStream, "to_dataset", no)
    entries = _entries(zoo, ("rn", "ft"))
    s = audit_fleet(entries, ["calibration", "rationality"], tmp_path / "s.sqlite", [name], device="cpu",
                    batch_size=16)
    assert s.computed == 2 and not s.failed and any("rationality: applies to none" in n for n in s.notes)
    audit_fleet(entries, ["calibration"], tmp_path / "m.sqlite", {"mem": memory}, device="cpu")
    a, b = ({(r["name"], r["metric"]): r["value"] for r in _rows(tmp_path / f"{x}.sqlite")["calibration"]}
            for x in ("s", "m"))
    assert a.keys() == b.keys() and len(a) >= 2 * 10
    for k in a:
        assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    again = audit_fleet(entries, ["calibration"], tmp_path / "s.sqlite", [name], device="cpu")
    assert again.computed == 0 and again.skipped == 2  # the stream's fingerprint is stable


def test_precision_auto_is_fp32_on_cpu_and_bf16_is_its_own_key(tmp_path, zoo, splits):
    """``precision="auto"`` resolves by device (fp32 on CPU: the same key as an explicit fp32); bf16 (autocast)
    results are stored under another key and agree with fp32 to bf16 precision."""
    from vlmfast.fleet.runner import check_audits

    _, res, keys = check_audits(["calibration"], None, "cpu")
    assert res["calibration"]["precision"] == "fp32"
    assert keys == check_audits(["calibration"], {"calibration": {"precision": "fp32"}}, "cpu")[2]
    assert check_audits(["calibration"], None, "cuda")[1]["calibration"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        check_audits(["calibration"], {"calibration": {"precision": "fp16"}})
    db = tmp_path / "a.sqlite"
    entries = _entries(zoo, ("ft",))
    audit_fleet(entries, ["calibration"], db, splits, device="cpu")
    s = audit_fleet(entries, ["calibration"], db, splits, device="cpu", settings={"calibration": {"precision": "bf16"}})
    assert s.computed == 2  # not reused: another key
    with AuditStore(db) as st:
        rows = st.results("calibration")
    by = {}
    for r in rows:
        by.setdefault(r["settings_key"], {})[(r["split"], r["metric"])] = r["value"]
    fp32, bf16 = by.values()
    assert any(bf16[k] != fp32[k] for k in fp32)  # autocast did run in bf16
    for k in (("id", "accuracy"), ("id", "ece"), ("noise-3", "nll")):
        assert bf16[k] == pytest.approx(fp32[k], abs=0.03), k
