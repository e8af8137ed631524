"""Train the stage-2 latent diffusion model on a frozen stage-1 autoencoder.

    python launchers/train_ldm.py                                   # demo preset, stage 1 from runs/vae-demo
    torchrun --nproc_per_node 2 launchers/train_ldm.py stage1.checkpoint=runs/vae-demo engine.name=fsdp2
    python launchers/train_ldm.py stage1.mlflow_run_id=<run id> tracking.uri=http://mlflow:5000

Runs unchanged under python, torchrun (single or multi node) and deepspeed; all the work is in
`scldm_scale.train.run.run_ldm`.
"""

from __future__ import annotations

from _cli import cli_main, parse

from scldm_scale.config import LDMExperimentConfig, load_config
from scldm_scale.train.run import RunResult, run_ldm


def main(argv: list[str] | None = None) -> RunResult:
    paths, overrides = parse(argv, "ldm", "Train the stage-2 latent diffusion model.")
    return run_ldm(load_config(LDMExperimentConfig, paths, overrides))


if __name__ == "__main__":
    cli_main(main)
