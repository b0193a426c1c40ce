"""The training loop: ``fit(model, loss_fn, batches, config)``.

Each step ``s`` (0-based): set every group's rate to ``config.lr * group["lr_scale"] * schedule(s)``; draw
``batch = batches(s)``; ``out = loss_fn(batch)`` under bf16 autocast when the precision asks for it; backward; clip
the global gradient norm (``grad_clip``); AdamW step; callbacks; every ``log_every`` steps a metrics record (and a
progress line or bar update); every ``checkpoint_every`` steps a resumable checkpoint (:mod:`vlmfast.train.state`).
After the last step a final checkpoint is written, so calling ``fit`` again with the same ``checkpoint_dir``
returns at once.

**Resume.** With ``checkpoint_dir`` set, ``fit`` first looks for the newest complete checkpoint there and, if the
run's fingerprint (the trajectory-defining settings and the parameter groups' names and shapes) matches, restores
model, optimizer, RNG states, losses and callback states and continues from its step. Because ``batches`` is a
function of the step (see :class:`vlmfast.train.EpochSampler`, :func:`vlmfast.train.step_generator`), the resumed
run computes exactly what the uninterrupted run would have (bitwise on CPU at a fixed thread count).

**Callbacks** (:class:`Callback`): ``on_train_start(state)``, ``on_step_end(state)`` every ``every`` steps,
``on_log(state, metrics)`` every ``log_every`` steps, ``on_train_end(state)``; ``state_dict()`` /
``load_state_dict()`` to be saved in checkpoints (an EMA teacher is a callback that holds its copy and updates it in
``on_step_end``). A plain callable in ``callbacks`` is called as ``on_step_end`` every step.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from vlmfast.train.config import TrainConfig
from vlmfast.train.params import no_weight_decay, param_groups
from vlmfast.train.schedule import SCHEDULE_FUNCTIONS
from vlmfast.train.state import newest_state, rng_state, save_state, seed_everything, set_rng_state


@dataclass
class TrainState:
    """What a run knows at a point in time; callbacks receive it, :func:`fit` returns it.

    ``step``: optimizer steps done so far. ``start_step``: the step this call started from (> 0 after a resume).
    ``losses``: the loss of every step (float). ``history``: the metrics records (one per ``log_every`` steps and
    one at the end). ``last_metrics``: the extra scalars ``loss_fn`` returned at the last step. ``elapsed_s``:
    training wall time, summed over resumed segments. ``lr_factor``: the schedule factor of the last step.
    ``grad_norm``: the global gradient norm before clipping at the last step (when ``grad_clip`` is set).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    step: int = 0
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    lr_factor: float = 0.0
    grad_norm: float | None = None
    resumed_from: str | None = None
    checkpoint_path: str | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    def mean_loss(self, last: int) -> float:
        """Mean loss over the last ``last`` steps (NaN before the first step)."""
        window = self.losses[-last:] if last > 0 else []
        return sum(window) / len(window) if window else math.nan

    def metrics(self, window: int | None = None) -> dict[str, float]:
        """A metrics record: step, mean loss over the last ``window`` steps (default ``log_every``), the learning
        rate at ``lr_scale`` 1 (``config.lr`` x schedule), grad norm, elapsed time, and ``loss_fn``'s extra
        scalars."""
        w = window or self.config.log_every
        out = {"step": self.step, "loss": self.mean_loss(w), "lr": self.config.lr * self.lr_factor,
               "elapsed_s": round(self.elapsed_s, 3)}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update(self.last_metrics)
        return out


class Callback:
    """Base class of training callbacks (module docstring); override what you need. ``every``: steps between
    ``on_step_end`` calls."""

    every: int = 1

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        """Saved in each checkpoint (tensors and plain values only); None: nothing to save."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LambdaCallback(Callback):
    """``fn(state)`` after every ``every``-th step."""

    def __init__(self, fn: Callable[[TrainState], Any], every: int = 1) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable (state) -> None, got {type(fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.fn, self.every = fn, every

    def on_step_end(self, state: TrainState) -> None:
        self.fn(state)


class MetricsCallback(Callback):
    """``fn(metrics)`` with each metrics record (every ``log_every`` steps and at the end); the records are also
    kept in ``self.records``."""

    def __init__(self, fn: Callable[[dict[str, float]], Any] | None = None) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"fn: expected a callable (metrics dict) -> None or None, got {type(fn).__name__}")
        self.fn = fn
        self.records: list[dict[str, float]] = []

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.records.append(dict(metrics))
        if self.fn is not None:
            self.fn(dict(metrics))


class _Progress:
    """A tqdm bar (stderr a terminal, or ``progress=True``), one line per ``log_every`` steps (``progress=None``
    and stderr not a terminal), or nothing (``progress=False``)."""

    def __init__(self, config: TrainConfig, start: int) -> None:
        self.config, self.bar, self.lines = config, None, False
        tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if config.progress is False:
            return
        if config.progress or tty:
            try:
                from tqdm.auto import tqdm

                try:  # a terminal that reports no size (some CI ptys) would get an empty or hidden bar
                    size = os.get_terminal_size(sys.stderr.fileno())
                except (OSError, ValueError, AttributeError):
                    size = os.terminal_size((0, 0))
                sized = size.columns > 0 and size.lines > 0
                self.bar = tqdm(total=config.steps, initial=start, desc=config.desc, unit="step", file=sys.stderr,
                                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                                leave=True)
                return
            except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
                pass
        self.lines = True
        self.t0, self.start = time.perf_counter(), start

    def update(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if state.step % 5 == 0 or state.done:
                self.bar.set_postfix(loss=f"{state.mean_loss(self.config.log_every):.4f}", refresh=False)

    def log(self, state: TrainState, metrics: dict[str, float]) -> None:
        if not self.lines:
            return
        done = state.step - self.start
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        eta = (state.config.steps - state.step) / rate if rate > 0 else math.nan
        print(f"{self.config.desc}: step {state.step}/{state.config.steps} loss {metrics['loss']:.4f} "
              f"lr {metrics['lr']:.3g} | {state.elapsed_s:.1f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` on a CUDA device that supports it, else ``"fp32"``; other values unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_groups(model: torch.nn.Module, params: Any) -> list[dict[str, Any]]:
    if params is None:
        return param_groups(model, no_decay=no_weight_decay)
    if isinstance(params, torch.Tensor):
        raise TypeError("params: expected an iterable of parameters or of param-group dicts, got one tensor")
    items = list(params)
    if not items:
        raise ValueError("params: expected at least one parameter or group, got none")
    if all(isinstance(g, Mapping) for g in items):
        groups = []
        for i, g in enumerate(items):
            if "params" not in g:
                raise ValueError(f"params[{i}]: a param group needs a 'params' entry")
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            groups.append({**g, "params": ps, "lr_scale": float(g.get("lr_scale", 1.0)),
                           "name": str(g.get("name", f"group{i}"))})
        return groups
    if all(isinstance(p, torch.Tensor) for p in items):
        return [{"params": items, "lr_scale": 1.0, "name": "default"}]
    raise TypeError("params: expected parameters or param-group dicts (not a mix)")


def _param_names(model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[list[str]]:
    """Names (in ``model``) of each group's parameters; ValueError for a parameter that is not the model's."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = []
    for gi, g in enumerate(groups):
        row = []
        for p in g["params"]:
            if id(p) not in by_id:
                raise ValueError(f"params: group {gi} ({g.get('name')!r}) has a parameter of shape {tuple(p.shape)} "
                                 "that is not one of model's parameters; every trained tensor must belong to model "
                                 "(that is what checkpoints save and resume restores)")
            if not p.requires_grad:
                raise ValueError(f"params: {by_id[id(p)]!r} has requires_grad=False; freeze by leaving it out")
            row.append(by_id[id(p)])
        names.append(row)
    flat = [n for row in names for n in row]
    if len(flat) != len(set(flat)):
        dup = sorted({n for n in flat if flat.count(n) > 1})
        raise ValueError(f"params: parameters in more than one group: {dup[:5]}")
    return names


def _loss_and_metrics(out: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, torch.Tensor):
        loss, extra = out, {}
    elif isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(f"loss_fn: a returned dict must hold the total under 'loss'; got keys {sorted(out)}")
        loss = out["loss"]
        extra = {}
        for k, v in out.items():
            if k == "loss":
                continue
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"loss_fn: metric {k!r} must be a scalar, got shape {tuple(v.shape)}")
                v = v.detach().item()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"loss_fn: metric {k!r} must be a number, got {type(v).__name__}")
            extra[str(k)] = float(v)
    else:
        raise TypeError(f"loss_fn: expected a scalar tensor or a dict with 'loss', got {type(out).__name__}")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn: the loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    if not loss.requires_grad:
        raise ValueError("loss_fn: the loss does not require grad (is it computed from the trained parameters, "
                         "outside torch.no_grad()?)")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss_fn: the loss is {value} at step {step} (0-based); lower lr, add grad_clip, "
                                 "or check the batch")
    return loss, extra


def _callbacks(callbacks: Iterable[Any]) -> list[Callback]:
    out = []
    for i, cb in enumerate(callbacks):
        if isinstance(cb, Callback):
            out.append(cb)
        elif callable(cb):
            out.append(LambdaCallback(cb))
        else:
            raise TypeError(f"callbacks[{i}]: expected a vlmfast.train.Callback or a callable (state) -> None, got "
                            f"{type(cb).__name__}")
    return out


def _trained_state(model: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The trained parameters and every buffer: what changes while training."""
    params = {n for n, _ in model.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names or k not in params}


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[Any], Any],
    batches: Callable[[int], Any],
    config: TrainConfig,
    *,
    params: Any = None,
    callbacks: Sequence[Any] = (),
) -> TrainState:
    """Train ``model`` for ``config.steps`` AdamW steps (module docstring); returns the final :class:`TrainState`.

    ``loss_fn(batch)``: the loss, a scalar tensor, or a dict with the total under ``"loss"`` and extra scalars to
    log. ``batches(step)``: the batch of a 0-based step — a pure function of the step (and the run's seed) so that
    resume is exact; :class:`EpochSampler` and :func:`step_generator` build such sources. ``params``: the
    parameters or param groups to train (default: :func:`param_groups` of ``model`` — every trainable parameter,
    no weight decay on biases, norms and embeddings); every one must belong to ``model``. Groups may carry
    ``lr_scale`` and ``weight_decay``. ``callbacks``: :class:`Callback` objects or callables ``(state)``.

    The caller chooses ``model.train()`` / ``eval()`` (frozen towers often stay in eval mode); ``fit`` changes
    neither. Errors: a non-finite loss raises FloatingPointError naming the step; a ``checkpoint_dir`` holding a
    run with other settings raises ValueError listing them.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (batch) -> loss, got {type(loss_fn).__name__}")
    if not callable(batches):
        raise TypeError(f"batches: expected a callable (step) -> batch, got {type(batches).__name__} (an iterator "
                        "cannot be resumed exactly; see vlmfast.train.EpochSampler)")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a vlmfast.train.TrainConfig, got {type(config).__name__}")
    groups = _as_groups(model, params)
    names = _param_names(model, groups)
    cbs = _callbacks(callbacks)
    device = _model_device(model)
    precision = resolve_precision(config.precision, device)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    schedule = config.schedule if callable(config.schedule) else SCHEDULE_FUNCTIONS[config.schedule]
    warmup = config.warmup_steps
    fingerprint = {
        "config": config.fingerprint(), "precision": precision,
        "groups": [{"name": g["name"], "lr_scale": g["lr_scale"], "weight_decay": g.get("weight_decay"),
                    "params": [[n, list(p.shape)] for n, p in zip(row, g["params"])]}
                   for g, row in zip(groups, names)],
    }
    state = TrainState(model=model, optimizer=optimizer, config=config)
    trained = {n for row in names for n in row}
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    found = newest_state(ckpt_dir, map_location=device) if ckpt_dir is not None else None
    if found is not None:
        _restore(state, cbs, found, fingerprint, trained)
    else:
        seed_everything(config.seed)
    state.start_step = state.step

    def checkpoint() -> None:
        payload = {
            "fingerprint": fingerprint, "model": _trained_state(model, trained),
            "optimizer": optimizer.state_dict(), "losses": torch.tensor(state.losses, dtype=torch.float64),
            "history": [dict(h) for h in state.history], "elapsed_s": state.elapsed_s, "rng": rng_state(),
            "callbacks": {str(i): cb.state_dict() for i, cb in enumerate(cbs) if cb.state_dict() is not None},
        }
        state.checkpoint_path = str(save_state(ckpt_dir, state.step, payload, config.keep_checkpoints))

    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    all_params = [p for g in groups for p in g["params"]]
    bar = _Progress(config, state.step)
    try:
        for cb in cbs:
            cb.on_train_start(state)
        t_seg = time.perf_counter()
        base_elapsed = state.elapsed_s
        while state.step < config.steps:
            s = state.step
            state.lr_factor = float(schedule(s, config.steps, warmup))
            for g in optimizer.param_groups:
                g["lr"] = config.lr * g["lr_scale"] * state.lr_factor
            batch = batches(s)
            with autocast():
                out = loss_fn(batch)
            loss, extra = _loss_and_metrics(out, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                state.grad_norm = float(torch.nn.utils.clip_grad_norm_(all_params, config.grad_clip))
            optimizer.step()
            state.step = s + 1
            state.losses.append(float(loss.detach()))
            state.last_metrics = extra
            state.elapsed_s = base_elapsed + time.perf_counter() - t_seg
            for cb in cbs:
                if state.step % cb.every == 0:
                    cb.on_step_end(state)
            bar.update(state)
            if state.step % config.log_every == 0 or state.done:
                m = state.metrics()
                state.history.append(m)
                bar.log(state, m)
                for cb in cbs:
                    cb.on_log(state, m)
            if ckpt_dir is not None and (state.done or (config.checkpoint_every
                                                         and state.step % config.checkpoint_every == 0)):
                checkpoint()
        for cb in cbs:
            cb.on_train_end(state)
    finally:
        bar.close()
    return state


def _restore(state: TrainState, cbs: list[Callback], found: tuple[Path, dict[str, Any]],
             fingerprint: dict[str, Any], trained: set[str]) -> None:
    path, saved = found
    old = saved.get("fingerprint", {})
    if old != fingerprint:
        diffs = []
        for key in ("config", "precision", "groups"):
            a, b = old.get(key), fingerprint[key]
            if key == "config" and isinstance(a, dict):
                diffs += [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                          if a.get(k) != b.get(k)]
            elif a != b:
                diffs.append(f"{key} differ")
        raise ValueError(f"checkpoint_dir: {path} belongs to a run with other settings ({'; '.join(diffs)}); use "
                         "another checkpoint_dir, or delete it to start over")
    model, optimizer = state.model, state.optimizer
    weights = saved["model"]
    missing = sorted(set(_trained_state(model, trained)) - set(weights))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks model entries {missing[:5]}")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    state.step = int(saved["step"])
    state.losses = [float(v) for v in saved["losses"].tolist()]
    state.history = [dict(h) for h in saved["history"]]
    state.elapsed_s = float(saved["elapsed_s"])
    state.resumed_from = str(path)
    state.checkpoint_path = str(path)
    for i, cb in enumerate(cbs):
        sd = saved.get("callbacks", {}).get(str(i))
        if sd is not None:
            cb.load_state_dict(sd)
