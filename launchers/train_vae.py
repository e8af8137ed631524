"""Train the stage-1 autoencoder (scLDM VAE).

    python launchers/train_vae.py                                   # demo preset, embedded demo atlas
    torchrun --nproc_per_node 2 launchers/train_vae.py --config configs/vae/debug.yaml engine.name=zero2
    deepspeed --num_gpus 2 launchers/train_vae.py train.max_steps=100

Runs unchanged under python, torchrun (single or multi node) and deepspeed; all the work is in
`scldm_scale.train.run.run_vae`.
"""

from __future__ import annotations

from _cli import cli_main, parse

from scldm_scale.config import VAEExperimentConfig, load_config
from scldm_scale.train.run import RunResult, run_vae


def main(argv: list[str] | None = None) -> RunResult:
    paths, overrides = parse(argv, "vae", "Train the stage-1 autoencoder.")
    return run_vae(load_config(VAEExperimentConfig, paths, overrides))


if __name__ == "__main__":
    cli_main(main)
