"""DeepSpeed ZeRO stage 0-3 engine. The only module of `distributed/` that imports deepspeed.

Choices, and why:
- The optimizer is a plain `torch.optim.AdamW` handed to DeepSpeed (FusedAdam / CPUAdam JIT-compile).
- Gradient accumulation uses DeepSpeed's own counter (`gradient_accumulation_steps`) with the boundary set
  explicitly from `no_sync()`, so ZeRO-2/3 partitioned reduction stays correct and `step()` runs once.
- The LR scheduler is stepped here, not by DeepSpeed, so skipped steps advance it exactly as in FSDP2.
- Skipping a step: the inner AdamW's `step` is gated off for one `engine.step()` call; DeepSpeed still
  runs its bookkeeping (clip, zero_grad, counters) but weights and moments stay untouched.
- ZeRO-0 also stores the fp32 model in that safetensors file (zero_to_fp32 does not read stage 0).
- DeepSpeed refuses to load ZeRO-1/2/3 optimizer shards at another data-parallel world size. With
  `engine.zero_reshardable_checkpoints` (default) rank 0 also stores full fp32 params and Adam moments
  (`reshard/*` in the safetensors file), from which a resume at any world size restores the exact state.
- A file write that fails inside DeepSpeed's `save_checkpoint` (full disk) is raised by `save` only after the
  save's last collective, so the other ranks are not left waiting in a barrier (the caller agrees on errors).
- Extra tensors (EMA) are consolidated to full fp32 and written by rank 0 as safetensors, so they load at
  any world size even for ZeRO-3 partitions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from scldm_scale.config.engine import EngineConfig
from scldm_scale.distributed.engine import OptimizerFactory, SchedulerFactory
from scldm_scale.distributed.parallelize import clean_name

logger = logging.getLogger(__name__)

DS_DIR = "deepspeed"
"""Sub-directory of a checkpoint holding DeepSpeed's own files."""
DS_TAG = "engine"
"""DeepSpeed checkpoint tag (one per checkpoint directory)."""
TENSORS_FILE = "tensors.safetensors"
"""Consolidated extra tensors (EMA), written by rank 0."""
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
"""Per-parameter optimizer state kept in the world-size independent copy."""


def import_deepspeed():
    """Import deepspeed with the CPU accelerator when there is no CUDA, and without the shm comm op."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    # Otherwise a fresh machine JIT-compiles an op training never uses (~2 minutes on CPU).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(cfg: EngineConfig, *, stage: int, grad_clip_norm: float, grad_accum_steps: int, precision: str) -> dict:
    """The DeepSpeed JSON config our engine runs with (exposed for benchmarks and tests)."""
    zero = {"stage": stage}
    if stage > 0:
        zero.update(
            reduce_bucket_size=cfg.zero_bucket_size,
            allgather_bucket_size=cfg.zero_bucket_size,
            overlap_comm=cfg.zero_overlap_comm,
            contiguous_gradients=True,
        )
    return {
        "train_micro_batch_size_per_gpu": 1,  # only feeds DeepSpeed's sample counters
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """`TrainEngine` over DeepSpeed ZeRO `stage`. See `TrainEngine` for the contract."""

    def __init__(
        self,
        cfg: EngineConfig,
        model: nn.Module,
        *,
        stage: int,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory,
        grad_clip_norm: float,
        grad_accum_steps: int,
        precision: str,
        device: torch.device,
        trainable: list[str],
    ) -> None:
        self._ds = import_deepspeed()
        self.name = f"zero{stage}"
        self.stage = stage
        self.device = device
        self.grad_clip_norm = grad_clip_norm
        self.grad_accum_steps = grad_accum_steps
        self.reshardable = cfg.zero_reshardable_checkpoints
        model = model.to(device)
        wanted = set(trainable)
        params = [p for n, p in model.named_parameters() if clean_name(n) in wanted]
        basic = optimizer_factory(params)
        # Built before the gate below: LambdaLR re-wraps `optimizer.step` and needs the bound method.
        self.lr_scheduler = scheduler_factory(basic)
        self._skip = False
        basic.step = self._gated(basic.step)
        config = ds_config(
            cfg, stage=stage, grad_clip_norm=grad_clip_norm, grad_accum_steps=grad_accum_steps, precision=precision
        )
        self.model, self.optimizer, _, _ = self._ds.initialize(model=model, optimizer=basic, config=config)
        self._basic = basic
        self._module = self.model.module
        self._params = {clean_name(n): p for n, p in self._module.named_parameters() if clean_name(n) in wanted}
        if precision == "bf16":
            # Mirror FSDP2's cast_forward_inputs: floating inputs follow the bf16 parameters.
            self._module.register_forward_pre_hook(_cast_inputs_bf16, with_kwargs=True)

    def _gated(self, step):
        @functools.wraps(step)
        def gated_step(*args, **kwargs):
            if self._skip:
                return None
            return step(*args, **kwargs)

        return gated_step

    @property
    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.model.set_gradient_accumulation_boundary(True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if max_norm != self.grad_clip_norm:
            raise ValueError(f"DeepSpeed clips inside step() at {self.grad_clip_norm}; got max_norm={max_norm}")
        from deepspeed.utils import safe_get_full_grad

        # Reduced gradients live in DeepSpeed's buffers (ZeRO partitions, bf16 fp32 accumulators);
        # safe_get_full_grad reads them per parameter (collective under ZeRO-1/2/3, same order on all ranks).
        # TODO(engineer-dist): one fused norm per group instead of per-parameter gathers at scale.
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self._params.values():
            grad = safe_get_full_grad(p)
            if grad is not None:
                total += grad.detach().float().pow(2).sum()
        return total.sqrt()

    def step(self) -> None:
        self.model.step()
        self.lr_scheduler.step()

    def skip_step(self) -> None:
        self._skip = True
        try:
            self.model.step()
        finally:
            self._skip = False
        self.lr_scheduler.step()

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def local_params(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            return {n: p.ds_tensor for n, p in self._params.items()}
        return dict(self._params)

    def gather_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return {n: _copy_fp32_cpu(t) for n, t in tensors.items()}
        out = {}
        world = dist.get_world_size()
        for name, shard in tensors.items():
            p = self._params[name]
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard.detach().contiguous())
            out[name] = _copy_fp32_cpu(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))
        return out

    def _scatter_full(self, full: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into `local_params`-shaped tensors (ZeRO-3: this rank's padded partition)."""
        rank = dist.get_rank()
        for name, target in into.items():
            src = full[name].to(target.device, target.dtype)
            if self.stage == 3:
                n = target.numel()
                flat = src.reshape(-1)[rank * n : (rank + 1) * n]
                target.zero_()
                target.view(-1)[: flat.numel()].copy_(flat)
            else:
                target.copy_(src.view_as(target))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self._module.named_parameters():
            name = clean_name(name)
            full = safe_get_full_fp32_param(p) if name in self._params else None
            if full is None:
                with self._ds.zero.GatheredParameters([p], enabled=self.stage == 3):
                    full = _copy_fp32_cpu(p)  # inside: ZeRO-3 re-partitions on exit
            out[name] = _copy_fp32_cpu(full)
        for name, buf in self._module.named_buffers():
            out[clean_name(name)] = _copy_fp32_cpu(buf)
        return out

    def save(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        with self._deferred_write_errors() as write_errors:
            self.model.save_checkpoint(str(path / DS_DIR), tag=DS_TAG, save_latest=False)
        flat = {}
        if self.stage == 0:
            # zero_to_fp32 cannot read stage 0; weights are replicated anyway, so store the fp32 masters.
            flat.update({f"model/{n}": t.contiguous() for n, t in self.full_state_dict().items()})
        elif self.reshardable:
            flat.update(self._reshard_state())
        for key, group in tensors.items():
            for name, t in self.gather_full(group).items():
                flat[f"{key}/{name}"] = t.contiguous()
        if dist.get_rank() == 0 and flat:
            save_file(flat, str(path / TENSORS_FILE))
        if write_errors:
            raise write_errors[0]  # only now: every collective of the save has run on every rank

    @contextlib.contextmanager
    def _deferred_write_errors(self) -> Iterator[list[BaseException]]:
        """DeepSpeed writes files between collectives (barriers, tag checks); a write that raised would leave
        the other ranks waiting in the next one. Failed writes are recorded instead and raised by `save`."""
        errors: list[BaseException] = []

        def deferring(write):
            @functools.wraps(write)
            def wrapped(*args, **kwargs):
                try:
                    return write(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - re-raised by save() after the collectives
                    errors.append(exc)

            return wrapped

        ckpt_engine = self.model.checkpoint_engine
        targets = [(ckpt_engine, "save"), (ckpt_engine, "makedirs"), (self.model, "_copy_recovery_script")]
        saved = [vars(obj).get(name) for obj, name in targets]  # instance attributes, if any
        for obj, name in targets:
            setattr(obj, name, deferring(getattr(obj, name)))
        try:
            yield errors
        finally:
            for (obj, name), old in zip(targets, saved):
                if old is None:
                    delattr(obj, name)  # back to the class's method
                else:
                    setattr(obj, name, old)

    def _reshard_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 params and Adam moments (collective per parameter; every rank ends up with them)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {}
        for name, p in self._params.items():
            out[f"reshard/param/{name}"] = safe_get_full_fp32_param(p).float().cpu().contiguous()
            for key in ADAM_KEYS:
                out[f"reshard/{key}/{name}"] = safe_get_full_optimizer_state(p, key).float().cpu().contiguous()
        steps = [st["step"] for st in self._basic.state.values() if "step" in st]
        out["reshard/step"] = torch.as_tensor(steps[0] if steps else 0.0, dtype=torch.float32).reshape(1)
        return out

    def load(self, path: Path, *, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        saved_world = len(list((path / DS_DIR / DS_TAG).glob("*optim_states.pt")))
        if self.stage > 0 and saved_world != dist.get_world_size():
            self._load_resharded(path, saved_world)
        else:
            load_path, _ = self.model.load_checkpoint(
                str(path / DS_DIR), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / DS_DIR}")
        if tensors:
            flat = load_file(str(path / TENSORS_FILE))
            for key, group in tensors.items():
                self._scatter_full({n: flat[f"{key}/{n}"] for n in group}, group)


    def _load_resharded(self, path: Path, saved_world: int) -> None:
        """Restore from the world-size independent copy (params, Adam moments and step; frozen tensors)."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )
        from safetensors.torch import load_file

        flat = load_file(str(path / TENSORS_FILE)) if (path / TENSORS_FILE).is_file() else {}
        if "reshard/step" not in flat:
            raise NotImplementedError(
                f"checkpoint {path} was written by {saved_world} ranks without engine.zero_reshardable_checkpoints; "
                f"resume it with {saved_world} ranks, or start a new run from load_model_weights"
            )
        logger.warning("DeepSpeed checkpoint from %d ranks: restoring from the consolidated copy", saved_world)
        self._ensure_optimizer_state()
        for name, p in self._params.items():
            value = flat[f"reshard/param/{name}"].to(self.device)
            moments = {key: flat[f"reshard/{key}/{name}"].to(self.device) for key in ADAM_KEYS}
            if self.stage == 3:
                # The full setters reject the padded last partition; write this rank's padded slice instead.
                safe_set_local_fp32_param(p, self._local_slice(p, value))
                for key, moment in moments.items():
                    safe_set_local_optimizer_state(p, self._local_slice(p, moment), key)
            else:
                safe_set_full_fp32_param(p, value)
                for key, moment in moments.items():
                    safe_set_full_optimizer_state(p, moment, key)
            # The low-precision / replicated model copy is refreshed from the masters only at the next
            # step, so set it too; ZeRO-3 re-partitions it when the gather context exits.
            with self._ds.zero.GatheredParameters([p], modifier_rank=0, enabled=self.stage == 3):
                if dist.get_rank() == 0 or self.stage != 3:
                    p.data.copy_(value.view_as(p.data))
        for state in self._basic.state.values():
            if "step" in state:
                state["step"] = flat["reshard/step"].reshape(()).clone().to(state["step"].device)
        frozen = [n for n, _ in self._module.named_parameters() if clean_name(n) not in self._params]
        if frozen or list(self._module.buffers()):
            self._load_frozen_and_buffers(path)

    def _local_slice(self, p: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        """This rank's ZeRO-3 partition of a full tensor, zero-padded to the partition size."""
        n = p.ds_tensor.numel()
        out = torch.zeros(n * dist.get_world_size(), dtype=value.dtype, device=value.device)
        out[: value.numel()] = value.reshape(-1)
        return out[dist.get_rank() * n : (dist.get_rank() + 1) * n]

    def _ensure_optimizer_state(self) -> None:
        """AdamW creates its state at the first step; DeepSpeed links its fragments after it. Do both now."""
        # ZeRO-3 installs its flat fp32 partitions in the param groups only while stepping.
        flat_groups = list(getattr(self.optimizer, "fp32_partitioned_groups_flat", []))
        for p in [p for group in self._basic.param_groups for p in group["params"]] + flat_groups:
            state = self._basic.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def _load_frozen_and_buffers(self, path: Path) -> None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(path / DS_DIR), tag=DS_TAG)
        for name, p in self._module.named_parameters():
            if clean_name(name) not in self._params:
                with self._ds.zero.GatheredParameters([p], modifier_rank=0, enabled=self.stage == 3):
                    p.data.copy_(full[clean_name(name)].view_as(p.data))
        for name, buf in self._module.named_buffers():
            buf.copy_(full[clean_name(name)].view_as(buf))


def _cast_inputs_bf16(module: nn.Module, args, kwargs):
    def cast(t):
        return t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tree_map(cast, args), tree_map(cast, kwargs)


def _copy_fp32_cpu(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 CPU copy: never an alias of a live parameter (1-rank full_tensor() returns the shard)."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)
