"""scVI (scvi-tools) as the peer of the quality benchmark: trained on the scLDM model's training cells and genes,
for a given wall time, and sampled per condition from its prior, for `evaluate(..., external=...)`.

Needs the optional `bench` extra (`pip install -e ".[bench]"`). The model: `SCVI` with the NB likelihood (as
scLDM's decoder), its default 10 latent dimensions, and the condition columns as categorical covariates, which
the decoder sees. Generation: z ~ N(0, I), the condition's codes, and the library size scLDM draws for the same
cell (so both models are scored on the same library sizes); counts ~ NB(mean, dispersion).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from scldm_scale.eval.evaluate import dense_counts, read_cells
from scldm_scale.eval.loading import Stage2Model

logger = logging.getLogger(__name__)

MAX_EPOCHS = 100_000
"""Effectively unbounded: the wall-time limit stops training."""


def training_anndata(model: Stage2Model, train_filter: str | None = None, max_cells: int = 10**7):
    """The model's training cells as AnnData: raw counts over its gene vocabulary, its label columns as obs."""
    import anndata
    import pandas as pd

    vf = train_filter or model.cfg.data.value_filter
    cells = read_cells(model, model.atlas_uri, vf, max_cells=max_cells, seed=0, batch_size=1024)
    obs = {}
    for j, (col, vocab) in enumerate(model.label_vocabs.items()):
        ids = cells.labels[:, j]
        obs[col] = pd.Categorical([vocab.categories[i - 1] if i > 0 else "unknown" for i in ids])
    var = pd.DataFrame(index=list(model.gene_vocab.feature_ids))
    return anndata.AnnData(X=dense_counts(model, cells).astype(np.float32), obs=pd.DataFrame(obs), var=var)


class ScviPeer:
    """An SCVI trained for `seconds` of wall time on the model's training cells; callable as an `ExternalSource`."""

    def __init__(self, model: Stage2Model, *, seconds: float, seed: int = 0, batch_size: int = 128,
                 train_filter: str | None = None) -> None:
        import scvi

        scvi.settings.seed = seed
        scvi.settings.progress_bar_style = "tqdm"
        self.columns = list(model.label_vocabs)
        self.vocabs = model.label_vocabs
        adata = training_anndata(model, train_filter)
        scvi.model.SCVI.setup_anndata(adata, categorical_covariate_keys=self.columns or None)
        self.model = scvi.model.SCVI(adata, gene_likelihood="nb")
        t0 = time.perf_counter()
        self.model.train(max_epochs=MAX_EPOCHS, max_time={"seconds": float(seconds)}, train_size=1.0,
                         batch_size=batch_size, accelerator="cpu", devices=1, enable_progress_bar=False,
                         check_val_every_n_epoch=None)
        self.train_seconds = time.perf_counter() - t0
        self.epochs = len(self.model.history["elbo_train"])  # one row per finished epoch
        self.num_cells = adata.n_obs
        self.num_genes = adata.n_vars
        registry = self.model.adata_manager.get_state_registry("extra_categorical_covs") if self.columns else None
        # code of each of our label ids, per column (scvi's own category order)
        self.codes = {}
        for col in self.columns:
            mapping = list(registry.mappings[col])
            self.codes[col] = {i + 1: mapping.index(c) for i, c in enumerate(self.vocabs[col].categories)
                               if c in mapping}
        logger.info("scVI: %d cells x %d genes, %s epochs in %.0f s", self.num_cells, self.num_genes, self.epochs,
                    self.train_seconds)

    def describe(self) -> dict[str, Any]:
        return {"model": "scvi.model.SCVI", "gene_likelihood": "nb", "n_latent": self.model.module.n_latent,
                "categorical_covariates": self.columns, "train_seconds": round(self.train_seconds, 1),
                "epochs": self.epochs, "cells": self.num_cells, "genes": self.num_genes,
                "cells_seen": self.epochs * self.num_cells}

    def _cat_covs(self, labels_NK: np.ndarray) -> torch.Tensor | None:
        if not self.columns:
            return None
        out = np.zeros(labels_NK.shape, np.int64)
        for j, col in enumerate(self.columns):
            missing = sorted({int(i) for i in labels_NK[:, j]} - set(self.codes[col]))
            if missing:
                raise ValueError(f"scVI peer: label ids {missing} of {col!r} were not in its training cells")
            out[:, j] = [self.codes[col][int(i)] for i in labels_NK[:, j]]
        return torch.from_numpy(out)

    @torch.no_grad()
    def __call__(self, labels_NK: np.ndarray, library_size: np.ndarray, seed: int) -> np.ndarray:
        """Raw counts (N, G): prior samples of the given conditions at the given library sizes."""
        module = self.model.module.eval()
        gen = torch.Generator().manual_seed(seed)
        n = len(labels_NK)
        z = torch.randn(n, module.n_latent, generator=gen)
        library = torch.log(torch.as_tensor(library_size, dtype=torch.float32)).reshape(n, 1)
        out = module.generative(z, library, torch.zeros(n, 1, dtype=torch.long), cat_covs=self._cat_covs(labels_NK))
        px = out["px"]
        torch.manual_seed(seed)  # the NB sampler (gamma-Poisson) draws from the global generator
        return px.sample().numpy()
