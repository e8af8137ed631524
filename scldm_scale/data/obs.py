"""Read encoded labels of atlas cells without touching X (e.g. the label mix of a split)."""

from __future__ import annotations

import dataclasses

import numpy as np

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data.loader import open_experiment
from scldm_scale.data.vocab import LabelVocab


def read_label_ids(
    cfg: SomaDataConfig, label_vocabs: dict[str, LabelVocab], *, atlas_uri: str, value_filter: str | None
) -> np.ndarray:
    """(N, K) label ids (columns in `label_vocabs` order; 0 = unknown) of the cells matching `value_filter`."""
    columns = list(label_vocabs)
    cfg = dataclasses.replace(cfg, label_columns=columns, value_filter=value_filter, val_value_filter=None)
    with open_experiment(cfg, atlas_uri) as exp:
        obs = exp.obs.read(value_filter=value_filter, column_names=["soma_joinid", *columns]).concat()
    if not columns:
        return np.zeros((obs.num_rows, 0), dtype=np.int64)
    return np.stack([label_vocabs[c].encode(obs.column(c))[0] for c in columns], axis=1)
