"""Fine-tuning plans (``vlmfast.fleet.plan``) and ``vlmfast finetune --plan``: validation, expansion and stable run
ids, running a small fleet into a manifest that ``audit_fleet`` reads, resuming a killed plan, recording a failing
run, the command line.

Every plan starts from a random-init ``vlmfast-tiny-rn`` (``model: vlmfast-tiny-rn``) and trains 1-2 steps on 20-40
images, on the CPU.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from vlmfast.fleet import audit_fleet, build_splits, load_manifest, load_plan, plan_from_dict, run_plan
from vlmfast.fleet.plan import settings_hash

from tests._utils import fake_discovery as _fake_discovery

TINY = {"version": 1, "model": "vlmfast-tiny-rn", "device": "cpu",
        "defaults": {"steps": 1, "train_n": 20, "batch_size": 8}}


def _plan(runs, **top):
    return plan_from_dict({**TINY, **top, "runs": runs}, where="test-plan")


def _write(tmp_path, runs, name="plan.yaml", **top):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({**TINY, **top, "runs": runs}, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def splits():
    return build_splits(("id",), n=20, seed=0)


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("text, match", [
    ("runs: []", r"runs: expected a non-empty list"),
    ("version: 3\nruns: [{method: ft}]", r"version: expected an int in 1\.\.1"),
    ("rnus: [{method: ft}]", r"rnus: unknown top-level key"),
    ("model: nope\nruns: [{method: ft}]", r"model: expected 'base' or an open_clip config name"),
    ("runs: [{name: a}]", r"runs\[0\] \('a'\): method: missing"),
    ("runs: [{method: sgd}]", r"runs\[0\]: method: expected one of"),
    ("runs: [{method: ft, stepz: 3}]", r"runs\[0\] \('ft'\): stepz: unknown field"),
    ("runs: [{method: ft, alpha: 0.5}]", r"runs\[0\] \('ft'\): alpha: not a field of method 'ft'"),
    ("runs: [{method: ft, steps: 0}]", r"runs\[0\] \('ft'\): steps: expected an int >= 1, got 0"),
    ("runs: [{method: ft, strength: [0.0, 1.0]}]", r"strength: expected a finite number in \[0.0, 1.0\)"),
    ("runs: [{method: ft, seed: []}]", r"\('ft'\): seed: expected a value or a non-empty list"),
    ("runs: [{method: ft, seed: [1, 1]}]", r"\('ft'\): seed: expected distinct values"),
    ("runs: [{method: ft, warmup: 1.5}]", r"warmup: expected an int number of steps >= 0 or a fraction"),
    ("runs: [{method: ft}, {method: ft}]", r"runs\[1\] \('ft'\): name: duplicate of runs\[0\]"),
    ("runs: [{name: 'a b', method: ft}]", r"runs\[0\] \('a b'\): name: expected a name of letters"),
    ("runs: [{method: coop, strength: 0.5}]", r"\('coop'\): strength: prompt tuning trains on the unbiased"),
    ("runs: [{method: wise-ft, alpha: 0.5}]", r"\('wise-ft'\): from: missing"),
    ("runs: [{method: wise-ft, from: x, alpha: 0.5}]", r"from: no entry named 'x'"),
    ("runs: [{method: lp}, {method: wise-ft, from: lp, alpha: 0.5}]",
     r"runs\[1\] \('wise-ft'\): from: expected an entry of method"),
    ("runs: [{method: wise-ft, from: ft, alpha: 2}, {method: ft}]", r"alpha: expected a finite number in \[0.0, 1.0\]"),
    ("runs: [{method: ravl}]", r"\('ravl'\): discovery: expected exactly one of discovery"),
    ("runs: [{method: ravl, discovery: nowhere}]", r"\('ravl'\): discovery: expected a folder with results.json"),
    ("runs: [{method: ravl, discover_from: zs}, {method: zs}]", r"discover_from: expected an entry of method"),
    ("runs: [{name: a, method: ravl, discover_from: b}, {name: b, method: ravl, discover_from: a}]",
     r"runs\[0\] \('a'\): discover_from: the entries \['a', 'b'\] depend on each other in a cycle"),
    ("runs: [{method: ft, data: [{strength: 0.5, seed: 1}]}]", r"\('ft'\): data\[0\]: seed: unknown field"),
    ("runs: [{method: ft, strength: 0.5, data: [{strength: 0.1}]}]", r"strength: set both as a field and in the data"),
    ("defaults: {method: ft}\nruns: [{method: ft}]", r"defaults: method: not a field every entry can share"),
    ("runs: [{method: ft, steps: 1]", r"not valid YAML"),
])
def test_plan_validation_errors(tmp_path, text, match):
    p = tmp_path / "plan.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ValueError, match=match) as info:
        load_plan(p)
    assert str(p) in str(info.value)


# ------------------------------------------------------------------------------------------------ expansion


def test_expansion_count_and_stable_ids():
    runs = [{"method": "zs"},
            {"name": "flyp", "method": "flyp", "seed": [0, 1], "strength": [0.0, 0.95]},
            {"name": "wise", "method": "wise-ft", "from": "flyp", "alpha": [0.5, 1.0]},
            {"name": "ft", "method": "ft", "lr": [1e-5, 3e-5], "data": [{"strength": 0.0}, {"strength": 0.5,
                                                                                            "train_n": 40}]},
            {"name": "rv", "method": "ravl", "discover_from": "flyp", "seed": 1, "strength": 0.95},
            {"name": "coop", "method": "coop", "dor": [False, True]}]
    plan = _plan(runs)
    ids = [r.run_id for r in plan.runs]
    assert len(ids) == len(set(ids)) == 1 + 4 + 8 + 4 + 1 + 2
    by_entry = {}
    for r in plan.runs:
        by_entry.setdefault(r.entry, []).append(r)
    assert re.fullmatch(r"flyp-seed1-strength0\.95-[0-9a-f]{10}", by_entry["flyp"][3].run_id)
    assert re.fullmatch(r"zs-[0-9a-f]{10}", by_entry["zs"][0].run_id)
    assert {r.run_id.rsplit("-", 1)[0] for r in by_entry["ft"]} == {
        "ft-lr1e-05-strength0", "ft-lr1e-05-strength0.5-train_n40", "ft-lr3e-05-strength0",
        "ft-lr3e-05-strength0.5-train_n40"}
    # the ravl run is paired with the flyp run of its seed and strength, and comes after it
    (rv,) = by_entry["rv"]
    src = [r for r in by_entry["flyp"] if r.seed == 1 and r.strength == 0.95][0]
    assert rv.depends_on == [src.run_id] and ids.index(src.run_id) < ids.index(rv.run_id)
    assert all(r.depends_on[0] in {f.run_id for f in by_entry["flyp"]} for r in by_entry["wise"])
    # stable: same plan -> same ids; entry order does not matter; a changed setting changes only its runs' ids
    assert [r.run_id for r in _plan(runs).runs] == ids
    reordered = _plan([runs[5], runs[4], runs[3], runs[2], runs[1], runs[0]])
    assert {r.run_id for r in reordered.runs} == set(ids)
    assert [r.run_id for r in reordered.runs].index(src.run_id) < [r.run_id for r in reordered.runs].index(rv.run_id)
    changed = _plan([*runs[:3], {**runs[3], "lr": [1e-5, 1e-4]}, *runs[4:]])
    new = {r.run_id for r in changed.runs} - set(ids)
    assert len(new) == 2 and all(i.startswith("ft-lr0.0001") for i in new)
    assert all(r.settings_hash == settings_hash(r.settings) and r.run_id.endswith(r.settings_hash[:10])
               for r in plan.runs)
    # a pretrained base is part of the settings
    base = plan_from_dict({"model": "base", "base_preset": "test", "runs": [{"method": "ft"}]})
    assert base.runs[0].run_id != _plan([{"method": "ft"}], defaults={}).runs[0].run_id


# ------------------------------------------------------------------------------------------------ running


def test_run_plan_manifest_and_audit(tmp_path, splits, monkeypatch):
    _fake_discovery(monkeypatch)
    runs = [{"method": "zs"},
            {"name": "ft", "method": "ft", "strength": [0.0, 0.95]},
            {"name": "flyp", "method": "flyp", "strength": 0.95},
            {"name": "wise", "method": "wise-ft", "from": "flyp", "alpha": 0.5},
            {"name": "rv", "method": "ravl", "discover_from": "flyp", "discovery_n": 20, "discovery_ks": [4, 6]},
            {"name": "coop", "method": "coop", "shots": 1, "n_ctx": 2, "train_n": 60}]
    plan = _plan(runs)
    reports = []
    s = run_plan(plan, tmp_path / "runs", progress=reports.append)
    assert s.failed == [] and len(s.done) == len(plan.runs) == 7 and s.skipped == []
    assert [r.status for r in reports] == ["done"] * 7 and "done (" in reports[0].line()
    out = tmp_path / "runs"
    for r in plan.runs:
        done = json.loads((out / r.run_id / "DONE").read_text())
        assert done["settings_hash"] == r.settings_hash
        assert not (out / r.run_id / "train").exists()  # the engine's checkpoints go once the run is done
    ft = plan.runs[1]
    assert {p.name for p in (out / ft.run_id / "model").iterdir()} == {"model.safetensors", "model.json",
                                                                      "head.safetensors"}
    card = json.loads((out / ft.run_id / "run.json").read_text())
    assert card["settings"]["data"] == {"train_n": 20, "strength": 0.0} and card["method"] == "ft"
    rv = [r for r in plan.runs if r.method == "ravl"][0]
    rv_card = json.loads((out / rv.run_id / "run.json").read_text())
    assert rv_card["split"]["images"] > 0 and rv_card["discovery"]["spurious_ids"] == [0]
    assert (out / rv.run_id / "discovery" / "medoids.safetensors").is_file()
    assert json.loads((out / "failures.json").read_text())["failures"] == []

    entries = load_manifest(s.manifest)
    assert [e.name for e in entries] == [r.run_id for r in plan.runs]
    kinds = {e.method: e.kind for e in entries}
    assert kinds == {"zero-shot": "clip", "ft": "classifier", "flyp": "classifier", "wise-ft": "classifier",
                     "ravl": "classifier", "coop": "prompt"}
    wise = [e for e in entries if e.method == "wise-ft"][0]
    assert wise.meta["alpha"] == 0.5 and wise.meta["source"] == plan.runs[3].run_id
    fleet = audit_fleet(s.manifest, ["calibration"], tmp_path / "audit.sqlite", {"id": splits["id"]}, device="cpu")
    assert fleet.failed == [] and fleet.done == 7 and fleet.computed == 7
    _check_prompt_and_group_rows(tmp_path / "audit.sqlite", entries, splits["id"].data)

    # a second call does nothing; the manifest is the same
    text = s.manifest.read_text()
    again = run_plan(plan, out)
    assert again.done == [] and len(again.skipped) == 7 and s.manifest.read_text() == text


def _check_prompt_and_group_rows(db, entries, data):
    """The prompt entry's base-to-new rows equal :func:`evaluate_base_to_new` (base = its trained classes); every
    entry's worst-group accuracy equals the RaVL evaluation's group table on the same logits."""
    import math

    import torch

    from vlmfast.fleet import AuditStore, load_entry
    from vlmfast.fleet.runner import BASE_NEW_METRICS
    from vlmfast.tuning import evaluate_base_to_new
    from vlmfast.tuning.region import _group_table
    from vlmfast.tuning.robust import predict

    with AuditStore(db) as st:
        names = {m["model_key"]: m["name"] for m in st.models()}
        got = {(names[r["model_key"]], r["metric"]): r["value"] for r in st.results("calibration")}
    coop = [e for e in entries if e.kind == "prompt"][0]
    learner = load_entry(coop, device="cpu").audited
    assert learner.classnames == list(data.classnames[:5])  # trained on the base half
    ref = evaluate_base_to_new(learner.model, learner, data, n_bins=15)
    expect = {"base_accuracy": ref["base"]["accuracy"], "new_accuracy": ref["new"]["accuracy"], "H": ref["H"],
              "base_ece": ref["base"]["ece"], "new_ece": ref["new"]["ece"], "base_ace": ref["base"]["ace"],
              "new_ace": ref["new"]["ace"]}
    for m in BASE_NEW_METRICS:
        assert got[(coop.name, m)] == pytest.approx(expect[m], abs=1e-6), m
    ft = [e for e in entries if e.method == "ft"][0]
    assert (ft.name, "new_ece") not in got  # base-to-new is for prompt learners only
    logits, _ = predict(load_entry(ft, device="cpu").audited, data)
    wg = _group_table(logits.argmax(1), torch.as_tensor(data.labels).long(), torch.as_tensor(data.has_spurious),
                      logits.shape[1])["worst_group"]
    assert not math.isnan(wg) and got[(ft.name, "worst_group_accuracy")] == pytest.approx(wg, abs=1e-12)


def test_killed_plan_resumes_only_the_rest(tmp_path, monkeypatch):
    from vlmfast.tuning import robust as R

    plan = _plan([{"name": "lp", "method": "lp", "seed": [0, 1, 2]}])
    real, calls, kill = R.fit, [], True

    def fit(*a, **kw):
        calls.append(kw["seed"])
        if len(calls) == 2 and kill:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(R, "fit", fit)
    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, out)
    first, second, third = plan.runs
    assert (out / first.run_id / "DONE").is_file() and not (out / second.run_id / "DONE").exists()
    assert [e.name for e in load_manifest(out / "manifest.yaml")] == [first.run_id]  # written on the way out
    (out / second.run_id / "stale.txt").write_text("half-written")
    kill, calls[:] = False, []
    s = run_plan(plan, out)
    assert calls == [1, 2] and s.skipped == [first.run_id] and s.done == [second.run_id, third.run_id]
    assert not (out / second.run_id / "stale.txt").exists()
    assert [e.name for e in load_manifest(out / "manifest.yaml")] == [r.run_id for r in plan.runs]
    # a DONE of other settings does not count
    done = json.loads((out / third.run_id / "DONE").read_text())
    (out / third.run_id / "DONE").write_text(json.dumps({**done, "settings_hash": "0" * 64}))
    calls[:] = []
    assert run_plan(plan, out, only=[third.run_id]).done == [third.run_id] and calls == [2]


def test_failing_run_is_recorded_and_the_rest_finish(tmp_path, monkeypatch):
    from vlmfast.tuning import robust as R

    plan = _plan([{"name": "ft", "method": "ft", "seed": [0, 1]},
                  {"name": "wise", "method": "wise-ft", "from": "ft", "alpha": 0.5}])
    real = R.fit

    def fit(*a, **kw):
        if kw["seed"] == 0:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(R, "fit", fit)
    lines = []
    s = run_plan(plan, tmp_path / "runs", progress=lambda r: lines.append(r.line()))
    ft0, ft1, w0, w1 = plan.runs
    assert s.done == [ft1.run_id, w1.run_id]
    assert s.failed == [(ft0.run_id, "RuntimeError: boom"),
                        (w0.run_id, f"RuntimeError: depends on {ft0.run_id}, which did not finish")]
    assert lines[0] == f"{ft0.run_id}: failed (RuntimeError: boom)"
    assert s.line().startswith("4 runs: 2 done, 0 skipped, 2 failed;") and "RuntimeError: boom" in s.line()
    rec = json.loads((tmp_path / "runs" / "failures.json").read_text())["failures"]
    assert [f["run_id"] for f in rec] == [ft0.run_id, w0.run_id] and "boom" in rec[0]["traceback"]
    assert [e.name for e in load_manifest(s.manifest)] == [ft1.run_id, w1.run_id]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tmp_path, capsys):
    from vlmfast.cli import main

    p = _write(tmp_path, [{"method": "zs"}, {"name": "lp", "method": "lp", "seed": [0, 1]}])
    out = tmp_path / "runs"
    argv = ["finetune", "--plan", str(p), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(re.fullmatch(r"\S+: done \(\d+\.\d s\)", ln) for ln in lines[:3])
    assert lines[-1].startswith("summary: 3 runs: 3 done, 0 skipped, 0 failed;") and "manifest: " in lines[-1]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(ln.endswith(": skipped (already done)") for ln in lines[:3])
    db = tmp_path / "audit.sqlite"
    assert main(["audit", "--manifest", str(out / "manifest.yaml"), "--audits", "calibration", "--db", str(db),
                 "--n", "20", "--splits", "id", "--no-progress", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("summary: 3 models: 3 done, 0 skipped, 0 failed")

    def err(args):
        rc = main(args)
        e = capsys.readouterr().err
        assert rc == 2 and e.count("\n") == 1, (rc, e)
        return e

    assert "--plan: the plan sets the methods and their settings; drop --method" in err(argv + ["--method", "ft"])
    assert "--only: expected run ids or entry names of the plan, got 'nope'" in err(argv + ["--only", "nope"])
    assert "--only: picks runs of a --plan" in err(["finetune", "--only", "x", "--out", str(tmp_path / "y")])
    bad = _write(tmp_path, [{"method": "ft", "steps": -1}], name="bad.yaml")
    assert f"{bad}: runs[0] ('ft'): steps: expected an int >= 1" in err(["finetune", "--plan", str(bad)])


def test_ravl_from_a_discovery_folder(tmp_path):
    """``discovery:`` a `vlmfast audit spurious` folder (its medoids and Stage-1 model), relative to the plan; the
    medoids' digest is part of the run id."""
    import torch
    from safetensors.torch import save_file

    from vlmfast.models import create_model, save_checkpoint
    from vlmfast.models.text import _output_dim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        stage1 = create_model("vlmfast-tiny-rn", device="cpu")
    ckpt = save_checkpoint(stage1, tmp_path / "stage1" / "model", {"method": "random"})
    disc = tmp_path / "disc"
    disc.mkdir()
    (disc / "results.json").write_text(json.dumps({"found": True, "model": str(ckpt), "base_preset": "test"}))
    g = torch.Generator().manual_seed(0)
    save_file({"medoid_embeddings": torch.randn(6, _output_dim(stage1), generator=g),
               "spurious_ids": torch.tensor([2, 0])}, str(disc / "medoids.safetensors"))
    p = _write(tmp_path, [{"name": "rv", "method": "ravl", "discovery": "disc"}])
    plan = load_plan(p)
    (run,) = plan.runs
    assert run.settings["discovery"]["path"] == str(disc) and run.settings["data"]["strength"] == 0.95
    s = run_plan(plan, tmp_path / "runs")
    assert s.done == [run.run_id], s.line()
    card = json.loads((tmp_path / "runs" / run.run_id / "run.json").read_text())
    assert card["discovery"] == {"folder": str(disc), "spurious_ids": [2]}  # the top cluster
    assert [e.kind for e in load_manifest(s.manifest)] == ["classifier"]
    save_file({"medoid_embeddings": torch.randn(6, _output_dim(stage1), generator=g),
               "spurious_ids": torch.tensor([2, 0])}, str(disc / "medoids.safetensors"))
    assert load_plan(p).runs[0].run_id != run.run_id  # another discovery: another run


def test_manifest_prompt_entries(tmp_path):
    from vlmfast.fleet import ManifestEntry, write_manifest

    with pytest.raises(ValueError, match="backbone: expected the learner's CLIP"):
        ManifestEntry("p", "x/learner", "prompt")
    with pytest.raises(ValueError, match="backbone: only for kind 'prompt' entries, got kind 'clip'"):
        ManifestEntry("c", "ck", "clip", backbone="base")
    entries = [ManifestEntry("p", "r/learner", "prompt", backbone="b/model.safetensors", root=tmp_path),
               ManifestEntry("q", "s/learner", "prompt", backbone="base:vlmfast-tiny-vit", preset="test",
                             root=tmp_path)]
    m = write_manifest(entries, tmp_path / "manifest.yaml")
    assert "backbone: b/model.safetensors" in m.read_text()
    loaded = load_manifest(m)
    assert loaded == entries and loaded[0].backbone_resolved == tmp_path / "b" / "model.safetensors"
    assert loaded[1].base_backbone and loaded[1].config == "vlmfast-tiny-vit" and loaded[0].config is None
    m.write_text("models: [{name: a, path: l, kind: prompt, backbone: ck, preset: test}]\n")
    with pytest.raises(ValueError, match=r"\('a'\): preset: only for kind 'base' entries"):
        load_manifest(m)
