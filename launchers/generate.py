"""Generate cells with a trained scLDM and write them as one .h5ad (optionally also into a SOMA atlas).

    python launchers/generate.py                                          # runs/ldm-demo, 1,000 cells
    python launchers/generate.py model.checkpoint=runs/ldm-demo like_split=test num_cells=2000 out=gen.h5ad
    python launchers/generate.py --condition "dataset_id=pbmc700,cell_type=CD19+ B:200" sampling.guidance=joint
    torchrun --nproc_per_node 2 launchers/generate.py model.mlflow_run_id=<stage-2 run> conditions_csv=mix.csv

Every rank generates its share; the file is the same for a seed at any world size. Settings: `key=value`
(see `scldm_scale/config/eval.py::GenerateConfig`) or a YAML file with `--config`.
"""

from __future__ import annotations

import argparse
import sys

from _cli import cli_main

from scldm_scale.config import load_config
from scldm_scale.config.eval import GenerateConfig
from scldm_scale.eval.run import run_generate


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Overrides: key=value")
    parser.add_argument("--config", action="append", default=[], help="YAML file of GenerateConfig fields")
    parser.add_argument("--condition", action="append", default=[], help='"col=value,col=value:count"; repeat')
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(GenerateConfig, args.config, overrides)
    cfg.conditions = [*cfg.conditions, *args.condition]
    run_generate(cfg)


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
