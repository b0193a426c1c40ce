"""vlmfast.train: config validation, schedules, parameter groups, deterministic batch sources, the loop (per-group
learning rates, clipping, callbacks, metrics, progress output) and exact resume — after an exception in a callback
and after a real SIGKILL of a training process."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vlmfast.train as T
from vlmfast.train.state import list_checkpoints

# A tiny job shared by this file and the subprocess of the SIGKILL test: model with dropout (global RNG), a batch
# source with per-step augmentation noise, AdamW with two groups, clipping and a warm-up + cosine schedule.
JOB = '''
import sys, time
import torch
import vlmfast.train as T


def build():
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 2))
    g = torch.Generator().manual_seed(99)
    x = torch.randn(90, 6, generator=g)
    y = torch.stack([x[:, :3].sum(1), x[:, 3:].prod(1)], 1)
    sampler = T.EpochSampler(90, 16, seed=5)

    def batches(step):
        idx = sampler(step)
        noise = 0.05 * torch.randn(len(idx), 6, generator=T.step_generator(5, step, "noise"))
        return x[idx] + noise, y[idx]

    def loss_fn(batch):
        xb, yb = batch
        return torch.nn.functional.mse_loss(model(xb), yb)

    groups = T.param_groups(model, [("0.*", {"lr_scale": 0.5, "name": "first"})])
    return model, loss_fn, batches, groups


def run(ckpt_dir, steps=24, every=2, sleep=0.0, callbacks=(), progress=False):
    model, loss_fn, batches, groups = build()
    cfg = T.TrainConfig(steps=steps, lr=3e-2, weight_decay=0.01, warmup=3, grad_clip=0.5, seed=7,
                        checkpoint_every=every if ckpt_dir else None, checkpoint_dir=ckpt_dir, progress=progress,
                        log_every=4)
    cbs = list(callbacks)
    if sleep:
        cbs.append(lambda state: time.sleep(sleep))
    model.train()
    state = T.fit(model, loss_fn, batches, cfg, params=groups, callbacks=cbs)
    return model, state


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], steps=int(sys.argv[2]), sleep=float(sys.argv[3]))
'''


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    import importlib.util

    path = tmp_path_factory.mktemp("job") / "train_job.py"
    path.write_text(JOB)
    spec = importlib.util.spec_from_file_location("train_job", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.PATH = path
    return mod


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------------------
# config, schedule, groups, sampling
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(steps=0), ValueError, r"steps: expected an int >= 1, got 0"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(steps=True), ValueError, "steps"),
        (dict(steps=5, lr=-1.0), ValueError, "lr"),
        (dict(steps=5, lr=float("nan")), ValueError, "lr"),
        (dict(steps=5, betas=(0.9,)), ValueError, "betas"),
        (dict(steps=5, betas=(0.9, 1.0)), ValueError, "betas"),
        (dict(steps=5, eps=0.0), ValueError, "eps"),
        (dict(steps=5, warmup=1.0), ValueError, "warmup"),
        (dict(steps=5, warmup=-1), ValueError, "warmup"),
        (dict(steps=5, schedule="linear"), ValueError, "schedule: expected one of"),
        (dict(steps=5, grad_clip=0.0), ValueError, "grad_clip"),
        (dict(steps=5, seed=-1), ValueError, "seed"),
        (dict(steps=5, checkpoint_every=2), ValueError, "checkpoint_every: needs checkpoint_dir"),
        (dict(steps=5, checkpoint_dir=3), TypeError, "checkpoint_dir"),
        (dict(steps=5, precision="fp16"), ValueError, "precision: expected one of"),
        (dict(steps=5, progress="yes"), TypeError, "progress"),
        (dict(steps=5, log_every=0), ValueError, "log_every"),
        (dict(steps=5, keep_checkpoints=0), ValueError, "keep_checkpoints"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        T.TrainConfig(**kwargs)


def test_config_warmup_and_fingerprint():
    assert T.TrainConfig(steps=200, warmup=0.05).warmup_steps == 10
    assert T.TrainConfig(steps=200, warmup=7).warmup_steps == 7
    a = T.TrainConfig(steps=10, progress=False, checkpoint_dir="x", checkpoint_every=2)
    b = T.TrainConfig(steps=10, progress=True, log_every=3)
    assert a.fingerprint() == b.fingerprint()  # output settings do not change the trajectory
    assert a.fingerprint() != T.TrainConfig(steps=11).fingerprint()


def test_cosine_with_warmup():
    f = [T.cosine_with_warmup(s, 10, 4) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a > b for a, b in zip(f[4:], f[5:])) and 0 < f[-1] < 0.1
    assert f[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert T.cosine_with_warmup(0, 5, 0) == 1.0
    assert [T.constant_with_warmup(s, 6, 2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


class _FakeClip(torch.nn.Module):
    """Parameter names as in open_clip's CLIP."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.transformer = torch.nn.Linear(4, 4)
        self.token_embedding = torch.nn.Embedding(10, 4)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(5, 4))
        self.ln_final = torch.nn.LayerNorm(4)
        self.text_projection = torch.nn.Parameter(torch.zeros(4, 4))
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))
        self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_param_groups_text_tower_and_no_decay():
    m = _FakeClip()
    groups = T.param_groups(m, [(T.is_text_tower, {"lr_scale": 0.05, "name": "text"})])
    names = {id(p): n for n, p in m.named_parameters()}
    by = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by == {
        "text": ["text_projection", "transformer.weight"],
        "text/no_decay": ["ln_final.bias", "ln_final.weight", "positional_embedding", "token_embedding.weight",
                          "transformer.bias"],
        "default": ["visual.0.weight"],
        "default/no_decay": ["logit_scale", "visual.0.bias", "visual.1.bias", "visual.1.weight"],
    }
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales["text"] == scales["text/no_decay"] == 0.05 and scales["default"] == 1.0
    wd = {g["name"]: g.get("weight_decay") for g in groups}
    assert wd == {"text": None, "text/no_decay": 0.0, "default": None, "default/no_decay": 0.0}
    # every trainable parameter once, the frozen one never
    flat = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(flat) == sorted(n for n, p in m.named_parameters() if p.requires_grad) and "frozen" not in flat
    # no exemptions (FLYP/CaRot decay everything); globs and float options
    g2 = T.param_groups(m, [(["visual.*", "logit_scale"], 2.0)], no_decay=None)
    assert [g["name"] for g in g2] == ["rule0", "default"] and g2[0]["lr_scale"] == 2.0


@pytest.mark.parametrize(
    "rules,exc,match",
    [
        ("visual.*", TypeError, "rules: expected a sequence"),
        ([("visual.*",)], TypeError, r"rules\[0\]: expected a \(selector, options\) pair"),
        ([(3, 1.0)], TypeError, r"rules\[0\]: expected a glob"),
        ([("visual.*", {"lr": 1.0})], ValueError, r"unknown options \['lr'\]"),
        ([("visual.*", {"lr_scale": -1.0})], ValueError, "lr_scale expected a float >= 0"),
        ([("visual.*", "fast")], TypeError, "expected a float lr_scale or a dict"),
    ],
)
def test_param_groups_errors(rules, exc, match):
    with pytest.raises(exc, match=match):
        T.param_groups(_FakeClip(), rules)


def test_param_groups_no_trainable_parameters():
    m = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        T.param_groups(m)


def test_epoch_sampler_is_a_pure_function_of_the_step():
    s = T.EpochSampler(50, 8, seed=3)
    assert s.batches_per_epoch == 6
    epoch0 = torch.cat([s(k) for k in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no repeats within an epoch
    assert not torch.equal(s(0), s(6))  # a fresh permutation per epoch
    fresh = T.EpochSampler(50, 8, seed=3)
    assert torch.equal(fresh(13), s(13)) and torch.equal(fresh(2), s(2))  # random access == sequential
    assert not torch.equal(T.EpochSampler(50, 8, seed=4)(0), s(0))
    with pytest.raises(ValueError, match="batch_size: expected at most n = 5"):
        T.EpochSampler(5, 8)
    with pytest.raises(ValueError, match="step"):
        s(-1)
    a = torch.rand(3, generator=T.step_generator(0, 5, "zoom"))
    assert torch.equal(a, torch.rand(3, generator=T.step_generator(0, 5, "zoom")))
    assert not torch.equal(a, torch.rand(3, generator=T.step_generator(0, 5, "noise")))


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------


def test_fit_learns_with_per_group_rates_and_clipping(job):
    seen = []

    def record(state):
        grads = [p.grad for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        seen.append(({g["name"]: g["lr"] for g in state.optimizer.param_groups}, norm, state.grad_norm))

    model, state = job.run(None, steps=40, callbacks=[record])
    assert state.step == 40 and len(state.losses) == 40 and state.start_step == 0
    assert sum(state.losses[-5:]) / 5 < 0.6 * sum(state.losses[:5]) / 5
    for s, (lrs, norm, before) in enumerate(seen):
        factor = T.cosine_with_warmup(s, 40, 3)
        assert lrs["first"] == pytest.approx(3e-2 * 0.5 * factor, rel=1e-12)
        assert lrs["default"] == pytest.approx(3e-2 * factor, rel=1e-12)
        assert norm <= 0.5 * (1 + 1e-5)  # clipped
    assert max(before for _, _, before in seen) > 0.5  # clipping had work to do
    assert [h["step"] for h in state.history] == [4 * k for k in range(1, 11)]


def test_loss_dict_metrics_and_metrics_callback():
    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3)
    records = []
    cb = T.MetricsCallback(records.append)

    def loss_fn(batch):
        err = model(batch) - batch.sum(1, keepdim=True)
        return {"loss": err.pow(2).mean(), "mae": err.abs().mean(), "count": 4}

    state = T.fit(model, loss_fn, lambda step: x, T.TrainConfig(steps=10, lr=0.05, log_every=5, progress=False),
                  callbacks=[cb])
    assert [r["step"] for r in records] == [5, 10] and cb.records == records
    assert set(records[0]) >= {"step", "loss", "lr", "elapsed_s", "mae", "count"} and records[1]["count"] == 4.0
    assert records[1]["loss"] == pytest.approx(sum(state.losses[5:]) / 5)


def test_fit_errors():
    model = torch.nn.Linear(3, 1)
    cfg = T.TrainConfig(steps=3, progress=False)
    x = torch.randn(4, 3)
    ok = lambda b: model(b).pow(2).mean()  # noqa: E731
    with pytest.raises(TypeError, match="batches: expected a callable"):
        T.fit(model, ok, iter([x]), cfg)
    with pytest.raises(TypeError, match="config: expected a vlmfast.train.TrainConfig"):
        T.fit(model, ok, lambda s: x, {"steps": 3})
    with pytest.raises(ValueError, match="not one of model's parameters"):
        T.fit(model, ok, lambda s: x, cfg, params=[torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="dict must hold the total under 'loss'"):
        T.fit(model, lambda b: {"l": ok(b)}, lambda s: x, cfg)
    with pytest.raises(ValueError, match="does not require grad"):
        T.fit(model, lambda b: ok(b).detach(), lambda s: x, cfg)
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        T.fit(model, lambda b: ok(b) * float("nan"), lambda s: x, cfg)
    with pytest.raises(TypeError, match=r"callbacks\[0\]"):
        T.fit(model, ok, lambda s: x, cfg, callbacks=[3])


def test_bf16_precision_runs_the_loss_under_autocast():
    model = torch.nn.Linear(8, 8)
    seen = []

    def loss_fn(b):
        seen.append(torch.is_autocast_enabled("cpu"))
        out = model(b)
        seen.append(out.dtype)
        return out.float().pow(2).mean()

    T.fit(model, loss_fn, lambda s: torch.randn(4, 8), T.TrainConfig(steps=2, precision="bf16", progress=False))
    assert seen == [True, torch.bfloat16] * 2
    seen.clear()
    T.fit(model, loss_fn, lambda s: torch.randn(4, 8), T.TrainConfig(steps=1, precision="auto", progress=False))
    assert seen == [False, torch.float32]  # auto is fp32 on CPU


def test_progress_output(capsys):
    model = torch.nn.Linear(2, 1)
    x = torch.randn(4, 2)

    def go(progress):
        T.fit(model, lambda b: model(b).pow(2).mean(), lambda s: x,
              T.TrainConfig(steps=12, log_every=4, progress=progress, desc="toy"))
        return capsys.readouterr()

    out = go(None)  # stderr is not a terminal under pytest: one line per log_every steps, no bar
    lines = out.err.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("toy: step 12/12 loss ") and "ETA" in lines[0]
    assert "\r" not in out.err and out.out == ""
    assert go(False).err == ""
    bar = go(True).err  # forced bar (tqdm)
    assert "toy" in bar and "12/12" in bar and "loss=" in bar


# ----------------------------------------------------------------------------------------------------------
# checkpoints and resume
# ----------------------------------------------------------------------------------------------------------


class _Counter(T.Callback):
    """A stateful callback: its count must survive a resume (as an EMA teacher's weights would)."""

    def __init__(self):
        self.count = 0

    def on_step_end(self, state):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, sd):
        self.count = sd["count"]


def test_resume_after_an_exception_equals_the_uninterrupted_run(job, tmp_path, one_thread):
    ref_model, ref = job.run(tmp_path / "ref")
    assert [s for s, _ in list_checkpoints(tmp_path / "ref")] == [24]  # keep_checkpoints=1, final included

    class Boom(Exception):
        pass

    def die_at_7(state):
        if state.step == 7:
            raise Boom

    with pytest.raises(Boom):
        job.run(tmp_path / "cut", callbacks=[_Counter(), die_at_7])
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [6]
    counter = _Counter()
    model, state = job.run(tmp_path / "cut", callbacks=[counter])
    assert state.start_step == 6 and state.resumed_from.endswith("step-00000006.pt")
    assert counter.count == 24  # 6 restored + 18 new: the interrupted step 7 is redone, not counted twice
    _assert_same_weights(model, ref_model)
    assert state.losses == ref.losses and [h["loss"] for h in state.history] == [h["loss"] for h in ref.history]
    # the checkpoint is plain tensors and containers: torch.load(weights_only=True) reads it
    saved = torch.load(list_checkpoints(tmp_path / "cut")[-1][1], weights_only=True)
    assert saved["step"] == 24 and saved["format"] == "vlmfast-train-state"
    # a finished run returns at once: no batch is drawn
    model2, _, _, groups = job.build()
    done = T.fit(model2, lambda b: pytest.fail("trained again"), lambda s: pytest.fail("drew a batch"),
                 T.TrainConfig(steps=24, lr=3e-2, weight_decay=0.01, warmup=3, grad_clip=0.5, seed=7,
                               checkpoint_dir=tmp_path / "cut", progress=False), params=groups)
    assert done.step == 24 and done.start_step == 24
    _assert_same_weights(model2, ref_model)


def test_resume_refuses_other_settings(job, tmp_path):
    job.run(tmp_path / "a", steps=4)
    model, loss_fn, batches, groups = job.build()
    cfg = T.TrainConfig(steps=4, lr=1e-3, weight_decay=0.01, warmup=3, grad_clip=0.5, seed=7,
                        checkpoint_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0\.03 vs now 0\.001\)"):
        T.fit(model, loss_fn, batches, cfg, params=groups)


def test_unreadable_newest_checkpoint_falls_back(job, tmp_path, one_thread):
    ref_model, _ = job.run(None, steps=8)
    with pytest.raises(KeyboardInterrupt):
        job.run(tmp_path / "c", steps=8, callbacks=[lambda s: (_ for _ in ()).throw(KeyboardInterrupt)
                                                    if s.step == 5 else None])
    # keep_checkpoints=1 left step 4; plant a corrupt "newer" one
    (tmp_path / "c" / "step-00000005.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="step-00000005.pt"):
        model, state = job.run(tmp_path / "c", steps=8)
    assert state.start_step == 4
    _assert_same_weights(model, ref_model)


def test_resume_after_sigkill_equals_the_uninterrupted_run(job, tmp_path, one_thread):
    """A real training process killed with SIGKILL (no clean-up runs) and resumed in this process ends with the
    weights of a run that was never interrupted."""
    ckpt = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(T.__file__).parents[2])] + sys.path))
    proc = subprocess.Popen([sys.executable, str(job.PATH), str(ckpt), "40", "0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = [s for s, _ in list_checkpoints(ckpt)]
            if steps and steps[-1] >= 6:
                break
            if proc.poll() is not None:
                pytest.fail(f"the training process ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint after 120 s")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    steps = [s for s, _ in list_checkpoints(ckpt)]
    assert steps and 6 <= steps[-1] < 40, steps  # killed mid-run
    model, state = job.run(ckpt, steps=40)
    assert state.start_step == steps[-1]
    ref_model, ref = job.run(None, steps=40)
    _assert_same_weights(model, ref_model)
    assert state.losses == ref.losses


@pytest.mark.parametrize("sized", [True, False])
def test_progress_bar_on_a_terminal(sized):
    """stderr a terminal (a pty, with and without a reported size, as some CI runners give): a tqdm bar with the
    loss, no log lines."""
    pty = pytest.importorskip("pty")
    import fcntl
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    if sized:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    code = ("import torch, vlmfast.train as T; m = torch.nn.Linear(2, 1); x = torch.randn(4, 2); "
            "T.fit(m, lambda b: m(b).pow(2).mean(), lambda s: x, T.TrainConfig(steps=30, log_every=10, desc='toy'))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(T.__file__).parents[2])] + sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    assert "toy: 100%" in text and "30/30" in text and "loss=" in text, text
    assert "toy: step 10/30" not in text
