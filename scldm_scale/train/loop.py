"""The training loop: one `Trainer` that talks only to a `TrainEngine`.

Reads top to bottom: resume, then per optimizer step fetch micro-batches, forward/backward each (no gradient
sync until the last), measure the global gradient norm, agree across ranks that loss and norm are finite,
step or skip, update EMA, log every `log_interval_steps`, checkpoint every `checkpoint.interval_steps` and
at the end. Stage maths lives in `step_fn(model, batch) -> LossOutput`; parallelism lives in the engine.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from scldm_scale.checkpoint import (
    DATALOADER,
    EMA,
    TRAIN_STATE,
    export_safetensors,
    load_checkpoint,
    load_latest,
    manifest_digest,
    save_checkpoint,
)
from scldm_scale.config.checkpoint import CheckpointConfig
from scldm_scale.config.train import TrainConfig
from scldm_scale.distributed import (
    TrainEngine,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    get_rank,
    get_world_size,
)
from scldm_scale.tracking import CHECKPOINT_DIGEST_TAG, CHECKPOINT_TAG
from scldm_scale.train.ema import EMA as EMAWeights
from scldm_scale.train.preemption import StopSignals
from scldm_scale.train.rank_stats import RANK_STATS_ENV, RankStats

logger = logging.getLogger(__name__)


class StatefulLoader(Protocol):
    """What the loop needs from a loader: batches, a world-size independent state, epochs."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...


StepFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]
"""`step_fn(model, batch) -> LossOutput(loss: scalar tensor, terms: dict[str, scalar tensor])`."""
Hook = Callable[["Trainer"], None]
"""Called after every optimizer step with the trainer (e.g. validation every N steps)."""


@dataclass
class TrainResult:
    """What `Trainer.train()` returns (host values)."""

    losses: list[float] = field(default_factory=list)
    """Global mean loss of every step run by this call (NaN/inf for skipped steps)."""
    grad_norms: list[float] = field(default_factory=list)
    """Global gradient norm of every step run by this call (before clipping)."""
    skipped_steps: int = 0
    """Steps skipped for non-finite loss / gradient norm, over the whole run (resumes included)."""
    start_step: int = 0
    """Step this call started from (> 0 after a resume)."""
    final_step: int = 0
    """Optimizer steps completed."""
    cells_seen: int = 0
    """Cells consumed over all ranks, whole run (padded duplicates from `data.remainder=pad` included)."""
    last_checkpoint: Path | None = None
    """Checkpoint written last by this call."""
    stopped_by: str | None = None
    """Name of the signal that stopped training early (after a checkpoint), None when it ran to the end."""


@dataclass
class StepOutput:
    """One optimizer step's results."""

    loss: float
    """Global mean loss (host: the finite check already synced it)."""
    grad_norm: torch.Tensor
    """Global gradient norm (device)."""
    terms: dict[str, torch.Tensor]
    """Local micro-batch mean of each loss term (device)."""
    cells: int
    """Cells in this step over all ranks (batch rows, padded duplicates included)."""
    skipped: bool
    """True when the step was skipped."""
    stop: bool = False
    """True when some rank was asked to stop (a signal): every rank sees the same value."""


class Trainer:
    """Runs `step_fn` through `engine` for `train.max_steps` optimizer steps, with resume and checkpoints.

    Padded cells (`batch["is_padding"]`, repeated by the loader's `data.remainder=pad` so every rank yields
    the same number of batches) are trained on like any other cell: the loop passes the whole batch to
    `step_fn`, whose loss is the mean over all B cells, and `cells_seen` / `StepOutput.cells` count every row
    of a batch (its first dimension), duplicates included. At most `world_size * micro_batch_size - 1` cells
    per epoch are such duplicates (DEVELOPERS.md, batch contract).

    Args:
        engine: from `build_engine`.
        step_fn: `step_fn(model, batch) -> LossOutput`; batch tensors are already on `engine.device`.
        loader: iterable of batch dicts with `state_dict` / `load_state_dict` / `set_epoch`; its state must
            be world-size independent (it is saved from rank 0 only).
        logger: anything with `log_metrics(dict, step)` (rank 0 gets the real one).
        cfg_train: loop settings (max_steps, accumulation, nonfinite policy, seed).
        cfg_ckpt: checkpoint interval, retention, resume mode, export.
        run_dir: run directory (checkpoints under `<run_dir>/checkpoints/`); default `cfg_train.run_dir`.
            The launchers leave it out; tests and benchmarks pass one to train outside the configured run_dir.
        manifest: stored in every checkpoint's meta.json (config yaml, gene vocab, library-size stats, run id).
        ema: optional `scldm_scale.train.ema.EMA`, updated after each applied step and checkpointed.
        hooks: callables `hook(trainer)` run after every step, before logging and checkpointing
            (rank-symmetric; they may use collectives). An extension point: the launchers pass none; tests
            use it (also by appending to `trainer.hooks`, a plain list, before `train()`).
        log_interval_steps: `tracking.log_interval_steps`.
        stop_signals: optional `StopSignals`; once any rank has received one, every rank stops after the same
            step with a checkpoint (`TrainResult.stopped_by`).
    """

    def __init__(
        self,
        *,
        engine: TrainEngine,
        step_fn: StepFn,
        loader: StatefulLoader,
        logger: Any,
        cfg_train: TrainConfig,
        cfg_ckpt: CheckpointConfig,
        manifest: dict[str, Any],
        run_dir: str | Path | None = None,
        ema: EMAWeights | None = None,
        hooks: Iterable[Hook] | None = None,
        log_interval_steps: int = 10,
        stop_signals: StopSignals | None = None,
    ) -> None:
        self.engine = engine
        self.step_fn = step_fn
        self.loader = loader
        self.metric_logger = logger
        self.cfg_train = cfg_train
        self.cfg_ckpt = cfg_ckpt
        self.run_dir = Path(cfg_train.run_dir if run_dir is None else run_dir)
        self.manifest = manifest
        self.ema = ema
        self.hooks: list[Hook] = list(hooks or [])
        self.log_interval_steps = log_interval_steps
        self.stop_signals = stop_signals
        self.step = 0
        self.cells_seen = 0
        self.skipped_steps = 0
        self.epoch = 0
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ the loop
    def train(self, *, until_step: int | None = None) -> TrainResult:
        """Train to `train.max_steps` (or stop early at `until_step`: preemption drills, tests)."""
        self.resume()
        max_steps = self.cfg_train.max_steps
        stop_at = min(max_steps, until_step) if until_step is not None else max_steps
        result = TrainResult(start_step=self.step)
        batches = self._batches()
        window = _Window()
        bar = self._progress_bar(max_steps)
        rank_stats = RankStats() if os.environ.get(RANK_STATS_ENV) else None
        while self.step < stop_at:
            micro_batches, data_seconds = [], 0.0
            for _ in range(self.cfg_train.grad_accum_steps):
                t0 = time.perf_counter()
                micro_batches.append(next(batches))
                data_seconds += time.perf_counter() - t0
            if rank_stats is not None:
                rank_stats.add(sum(_num_cells(b) for b in micro_batches), data_seconds)
            out = self.train_step(micro_batches)
            self.step += 1
            out.stop = out.stop and self.step < stop_at  # a request on the last step changes nothing
            self.cells_seen += out.cells
            result.losses.append(out.loss)
            result.grad_norms.append(float(out.grad_norm))  # already synced by the finite check
            window.add(out, data_seconds)
            for hook in self.hooks:
                hook(self)
            if self.step % self.log_interval_steps == 0 or self.step == stop_at or out.stop:
                self._log(window, out)
                window = _Window()
            if self.step % self.cfg_ckpt.interval_steps == 0 or self.step == max_steps or out.stop:
                self.save()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.4g}", refresh=False)
            if out.stop:
                result.stopped_by = self._stop_name()
                logger.warning("stopped at step %d (%s): checkpoint %s", self.step, result.stopped_by, self.last_checkpoint)
                break
        if bar is not None:
            bar.close()
        if rank_stats is not None:
            rank_stats.write(Path(os.environ[RANK_STATS_ENV]))
        if self.step == max_steps and self.cfg_ckpt.enable_export_at_end and self.last_checkpoint is not None:
            if get_rank() == 0:
                export_safetensors(self.last_checkpoint, self.last_checkpoint / "model.safetensors")
        result.final_step, result.skipped_steps = self.step, self.skipped_steps
        result.cells_seen, result.last_checkpoint = self.cells_seen, self.last_checkpoint
        return result

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepOutput:
        """One optimizer step over `grad_accum_steps` micro-batches."""
        engine = self.engine
        loss_sum = torch.zeros((), device=engine.device)
        terms: dict[str, torch.Tensor] = {}
        cells = 0
        for i, batch in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            # Gradients are reduced across ranks only on the last micro-batch (nanoGPT's require_backward_grad_sync).
            with contextlib.nullcontext() if is_last else engine.no_sync():
                out = self.step_fn(engine.model, _to_device(batch, engine.device))
                engine.backward(out.loss)
            loss_sum += out.loss.detach().float()
            for name, value in out.terms.items():
                terms[name] = terms.get(name, 0.0) + value.detach().float() / len(micro_batches)
            cells += _num_cells(batch)
        loss = loss_sum / len(micro_batches)
        grad_norm = engine.clip_grad_norm(engine.grad_clip_norm)
        # Every rank must agree before stepping: sum (loss, non-finite flag, cells, stop request) over ranks
        # in one call, so a signal that reached one rank stops them all after this same step.
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
        host = torch.tensor([float(cells), float(self._stop_requested())], device=engine.device)
        reduced = all_reduce_sum(torch.cat([torch.stack([loss, bad.to(loss.dtype)]), host.to(loss.dtype)]))
        global_loss, n_bad, global_cells, n_stop = reduced.tolist()  # host sync, every step: the skip decision needs it
        global_loss /= get_world_size()
        skipped = n_bad > 0
        if skipped:
            self._on_nonfinite(global_loss, float(grad_norm))
            engine.skip_step()
        else:
            engine.step()
            if self.ema is not None:
                self.ema.update()
        return StepOutput(global_loss, grad_norm.detach(), terms, int(global_cells), skipped, stop=n_stop > 0)

    # ------------------------------------------------------------------ helpers
    def _stop_requested(self) -> bool:
        return self.stop_signals is not None and self.stop_signals.requested

    def _stop_name(self) -> str:
        received = self.stop_signals.received if self.stop_signals is not None else None
        return received.name if received is not None else "a peer's stop request"

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        step = self.step + 1
        message = f"non-finite loss or gradient norm at step {step} (loss={loss}, grad_norm={grad_norm})"
        if self.cfg_train.nonfinite == "stop":
            raise FloatingPointError(message + "; set train.nonfinite=skip to skip such steps")
        self.skipped_steps += 1
        if self.skipped_steps > self.cfg_train.max_skipped_steps:
            raise FloatingPointError(
                f"{message}; {self.skipped_steps} steps skipped > train.max_skipped_steps={self.cfg_train.max_skipped_steps}"
            )
        logger.warning("%s: step skipped (%d so far)", message, self.skipped_steps)

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches; a new epoch starts when the loader is exhausted."""
        while True:
            yield from self.loader
            self.epoch += 1
            self.loader.set_epoch(self.epoch)

    def _log(self, window: _Window, last: StepOutput) -> None:
        """Reduce the window's metrics across ranks and log them (host syncs happen here, on log steps)."""
        names = sorted(window.terms)
        device = self.engine.device  # every collective's tensor lives on the engine's device (NCCL needs it)
        local = torch.stack([window.terms[n] / max(1, window.steps) for n in names]) if names else None
        terms = all_reduce_mean(local.to(device)).tolist() if local is not None else []  # host sync: log step
        elapsed = max(window.elapsed(), 1e-9)
        host = torch.tensor([window.data_seconds / elapsed, _rss_gb()], device=device)
        data_frac, rss = all_reduce_max(host).tolist()  # host sync: log step
        metrics = {
            "train/loss": sum(window.losses) / max(1, len(window.losses)),
            "train/grad_norm": float(last.grad_norm),
            "train/lr": self.engine.lr,
            "train/skipped_steps": float(self.skipped_steps),
            "train/epoch": float(self.epoch),
            "train/cells_seen": float(self.cells_seen),
            "sys/cells_per_second": window.cells / elapsed,
            "sys/cells_per_second_per_rank": window.cells / elapsed / get_world_size(),
            "sys/data_wait_fraction_max": data_frac,
            "sys/rss_gb_max": rss,
        }
        metrics.update({f"train/{n}": v for n, v in zip(names, terms)})
        if torch.cuda.is_available():
            metrics["sys/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if get_rank() == 0:
            self.metric_logger.log_metrics(metrics, step=self.step)

    def _progress_bar(self, max_steps: int):
        if get_rank() != 0 or not self.cfg_train.enable_progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON state saved with every checkpoint (rank 0's loader state is the global one)."""
        state = {
            TRAIN_STATE: {
                "step": self.step,
                "cells_seen": self.cells_seen,
                "skipped_steps": self.skipped_steps,
                "epoch": self.epoch,
                "seed": self.cfg_train.seed,
            },
            DATALOADER: self.loader.state_dict(),
        }
        if self.ema is not None:
            state[EMA] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict` (every rank)."""
        train_state = state[TRAIN_STATE]
        self.step = int(train_state["step"])
        self.cells_seen = int(train_state["cells_seen"])
        self.skipped_steps = int(train_state["skipped_steps"])
        self.epoch = int(train_state["epoch"])
        self.loader.load_state_dict(state[DATALOADER])
        if self.ema is not None and EMA in state:
            self.ema.load_state_dict(state[EMA])

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {EMA: self.ema.tensors()} if self.ema is not None else {}

    def save(self) -> Path:
        """Write and publish a checkpoint of the current step (collective)."""
        run_id = getattr(self.metric_logger, "run_id", None)
        if run_id is not None and "mlflow_run_id" in self.manifest:  # known now if the server was down at start
            self.manifest["mlflow_run_id"] = run_id
        self.last_checkpoint = save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            extra_state=self.state_dict(),
            manifest=self.manifest,
            tensors=self._tensors(),
            keep_latest_k=self.cfg_ckpt.keep_latest_k,
        )
        if get_rank() == 0 and hasattr(self.metric_logger, "set_tags"):
            # Where the run's newest checkpoint is, and the digest a load by run id checks it against.
            ckpt = self.last_checkpoint.resolve()
            self.metric_logger.set_tags({CHECKPOINT_TAG: str(ckpt), CHECKPOINT_DIGEST_TAG: manifest_digest(ckpt)})
        return self.last_checkpoint

    def resume(self) -> bool:
        """Apply `checkpoint.resume` (auto / never / path); True when a checkpoint was loaded."""
        mode = self.cfg_ckpt.resume
        if mode == "never":
            return False
        seed = self.cfg_train.seed
        if mode == "auto":
            state = load_latest(self.engine, self.run_dir, tensors=self._tensors(), seed=seed)
        else:
            state = load_checkpoint(self.engine, mode, tensors=self._tensors(), seed=seed)
        if state is None:
            return False
        self.load_state_dict(state)
        return True


class _Window:
    """Accumulators between two log steps (device tensors for terms: no host sync per step)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.losses: list[float] = []
        self.terms: dict[str, torch.Tensor] = {}
        self.cells = 0
        self.data_seconds = 0.0

    def add(self, out: StepOutput, data_seconds: float) -> None:
        self.steps += 1
        self.losses.append(out.loss)
        for name, value in out.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.cells += out.cells
        self.data_seconds += data_seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _num_cells(batch: dict[str, torch.Tensor]) -> int:
    """Rows of the batch (its first tensor's first dimension): padded duplicates (`is_padding`) included."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _rss_gb() -> float:
    try:
        import psutil
    except ImportError:
        return math.nan
    return psutil.Process().memory_info().rss / 2**30
