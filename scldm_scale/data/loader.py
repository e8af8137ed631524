"""`build_loader(cfg, ...)` -> `SomaLoader`: opens and checks the atlas, builds vocabularies, owns epochs and
the exact, elastic resume state. The trainer talks only to this module's public names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tiledbsoma
import torch
from torch.utils.data import DataLoader

from scldm_scale.config import ConfigError
from scldm_scale.config.data import DEFAULT_LABEL_COLUMNS, DEMO_ATLAS, SomaDataConfig
from scldm_scale.data.budget import read_budget_mb
from scldm_scale.data.cells import CellSelection, iter_obs, select_cells
from scldm_scale.data.collate import to_tensors
from scldm_scale.data.context import COMMITTED_TIMESTAMP_KEY, make_soma_context, open_committed
from scldm_scale.data.dataset import SomaCellDataset
from scldm_scale.data.node_cache import layout_for
from scldm_scale.data.order import Piece, consumed_ranges, rank_num_batches, remaining
from scldm_scale.data.stream import LoaderSpec, cap_seed, iter_slot, iter_workers
from scldm_scale.data.vocab import GeneVocab, LabelVocab
from scldm_scale.utils.env import get_rank, get_world_size

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class NoSharedGenesError(ValueError):
    """The atlas var and the gene vocabulary given to `build_loader` have no gene in common."""
_FROM_CONFIG: Any = object()


def open_experiment(cfg: SomaDataConfig, atlas_uri: str | None = None) -> tiledbsoma.Experiment:
    """Open the atlas and check it against the config: measurement, X layer (sparse), var `feature_id`, the
    obs columns named by `data.label_columns`, `data.value_filter` and `data.val_value_filter`.

    Raises:
        ConfigError: one line listing every problem found, each naming its `data.*` key.
    """
    uri = atlas_uri or cfg.atlas_uri
    if uri == DEMO_ATLAS:
        raise ValueError(
            "data.atlas_uri='demo' must be resolved to a path first (data_pipelines.demo.ensure_demo_atlas)"
        )
    # Start-up reads (the obs pass, sampled nnz, library-size sample) under the same per-query cap as the
    # workers' reads: uncapped, TileDB's default budget let a sample spread over a 10^6-cell atlas add
    # ~100 MB to rank 0's peak.
    ctx = make_soma_context(
        uri, cfg.s3_endpoint_url, verify_tls=cfg.s3_verify_tls, read_budget_mb=read_budget_mb(cfg)
    )
    try:
        exp = open_committed(uri, ctx)  # as of the last committed ingest (docs/object_store.md)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"data.atlas_uri={uri!r} is not a readable SOMA Experiment ({reason}); point it at an atlas written "
            "by python -m data_pipelines.ingest"
        ) from exc
    problems = []
    if cfg.measurement_name not in exp.ms:
        problems.append(
            f"data.measurement_name={cfg.measurement_name!r} not in the atlas ({sorted(exp.ms.keys())})"
        )
    else:
        ms = exp.ms[cfg.measurement_name]
        if "X" not in ms or cfg.layer_name not in ms.X:
            layers = sorted(ms.X.keys()) if "X" in ms else []
            problems.append(f"data.layer_name={cfg.layer_name!r} not among X layers {layers}")
        elif not isinstance(ms.X[cfg.layer_name], tiledbsoma.SparseNDArray):
            problems.append(f"data.layer_name={cfg.layer_name!r} is not a sparse X layer")
        if "feature_id" not in ms.var.schema.names:
            problems.append("the atlas var has no `feature_id` column (the gene key)")
    obs_cols = list(exp.obs.schema.names)
    if cfg.label_columns is not None:
        missing = [c for c in cfg.label_columns if c not in obs_cols]
        if missing:
            problems.append(
                f"data.label_columns names {', '.join(map(repr, missing))}, not an obs column of the atlas at "
                f"{uri} (obs columns: {', '.join(obs_cols)}); list only those, or set data.label_columns=null "
                f"(auto: {' and '.join(DEFAULT_LABEL_COLUMNS)} where present)"
            )
    for key, value_filter in (
        ("data.value_filter", cfg.value_filter),
        ("data.val_value_filter", cfg.val_value_filter),
    ):
        problems += check_value_filter(key, value_filter, obs_cols, uri)
    if problems:
        exp.close()
        raise ConfigError("; ".join(problems))
    return exp


_FILTER_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "true", "false", "none", "null", "nan"})


def filter_columns(value_filter: str) -> list[str]:
    """The column names a SOMA value_filter refers to: identifiers outside quotes, not keywords or calls."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", " ", value_filter)
    names = re.findall(r"(?<![\w.])([A-Za-z_]\w*)\b(?!\s*\()", text)
    return list(dict.fromkeys(n for n in names if n.lower() not in _FILTER_KEYWORDS))


def check_value_filter(key: str, value_filter: str | None, obs_columns: list[str], uri: str) -> list[str]:
    """One problem per column that `value_filter` (the config value of `key`) names and obs lacks."""
    if value_filter is None:
        return []
    problems = []
    for col in (c for c in filter_columns(value_filter) if c not in obs_columns):
        fix = (
            "re-ingest with a current data_pipelines.ingest (it adds split)"
            if col == "split"
            else f"fix the filter (obs columns: {', '.join(obs_columns)})"
        )
        problems.append(
            f"{key}={value_filter!r}: the atlas at {uri} has no obs column {col!r}; {fix} or set {key}=null"
        )
    return problems


def resolve_label_columns(
    cfg: SomaDataConfig, obs_columns: list[str], label_vocabs: dict[str, LabelVocab] | None = None
) -> list[str]:
    """The label columns of a run: `data.label_columns` as listed, else (null = auto) the columns of the
    given training vocabularies, else those of `DEFAULT_LABEL_COLUMNS` the atlas obs has.

    Raises:
        ConfigError: naming a listed or vocabulary column the obs lacks, with the obs columns.
    """
    if cfg.label_columns is not None:
        columns = list(cfg.label_columns)
    elif label_vocabs is not None:
        columns = list(label_vocabs)
    else:
        return [c for c in DEFAULT_LABEL_COLUMNS if c in obs_columns]
    missing = [c for c in columns if c not in obs_columns]
    if missing:
        raise ConfigError(
            f"data.label_columns: {', '.join(map(repr, missing))} not in the atlas obs columns "
            f"({', '.join(obs_columns)})"
        )
    return columns


def _read_var(exp: tiledbsoma.Experiment, cfg: SomaDataConfig):
    var = exp.ms[cfg.measurement_name].var
    cols = [c for c in ("soma_joinid", "feature_id", "feature_name", "n_cells") if c in var.schema.names]
    return var.read(column_names=cols).concat().to_pandas()


_N_CELLS_READ = 100_000
"""Cells per X read when counting genes over the training cells."""


def _training_n_cells(exp: tiledbsoma.Experiment, cfg: SomaDataConfig, var_joinids: np.ndarray) -> np.ndarray:
    """Cells with a non-zero count, per var row, among the training cells (`data.value_filter`)."""
    counts = np.zeros(int(var_joinids.max()) + 1, np.int64)
    X = exp.ms[cfg.measurement_name].X[cfg.layer_name]
    found = 0
    for obs in iter_obs(exp, cfg.value_filter, []):  # one obs slice at a time: no full joinid column
        cells = obs.column("soma_joinid").to_numpy()
        found += len(cells)
        for start in range(0, len(cells), _N_CELLS_READ):
            for tbl in X.read((cells[start : start + _N_CELLS_READ],)).tables():
                counts += np.bincount(tbl["soma_dim_1"].to_numpy(), minlength=len(counts))[: len(counts)]
    if not found:
        raise ValueError(
            f"data.min_gene_cells_scope='train': no cell matches data.value_filter={cfg.value_filter!r}"
        )
    return counts[var_joinids]


def _vocab_from_var(exp: tiledbsoma.Experiment, cfg: SomaDataConfig, var) -> GeneVocab:
    if cfg.min_gene_cells > 0 and cfg.min_gene_cells_scope == "train":
        n_cells = _training_n_cells(exp, cfg, var["soma_joinid"].to_numpy())
    else:
        n_cells = var["n_cells"].to_numpy() if "n_cells" in var else None
    return GeneVocab.from_var(
        var["feature_id"].tolist(),
        feature_names=var["feature_name"].tolist() if "feature_name" in var else None,
        n_cells=n_cells,
        min_gene_cells=cfg.min_gene_cells,
    )


def build_gene_vocab(cfg: SomaDataConfig, *, atlas_uri: str | None = None) -> GeneVocab:
    """Gene vocabulary of the atlas var (var order), keeping genes seen in `data.min_gene_cells` cells (counted
    over the atlas or the training cells: `data.min_gene_cells_scope`)."""
    with open_experiment(cfg, atlas_uri) as exp:
        return _vocab_from_var(exp, cfg, _read_var(exp, cfg))


def build_label_vocabs(
    cfg: SomaDataConfig, *, atlas_uri: str | None = None, value_filter: str | None = _FROM_CONFIG
) -> dict[str, LabelVocab]:
    """One LabelVocab per label column (`resolve_label_columns`), categories from obs of the (training)
    filter, sorted."""
    vf = cfg.value_filter if value_filter is _FROM_CONFIG else value_filter
    with open_experiment(cfg, atlas_uri) as exp:
        columns = resolve_label_columns(cfg, exp.obs.schema.names)
        if not columns:
            return {}
        seen: dict[str, set] = {c: set() for c in columns}
        for obs in iter_obs(exp, vf, columns):  # one obs slice at a time
            for c in columns:
                seen[c] |= LabelVocab.distinct(obs.column(c))
    return {c: LabelVocab(c, sorted(seen[c])) for c in columns}


class SomaLoader:
    """Batches of one rank for one epoch at a time, with an exact, world-size independent state.

    Iterate it once per epoch. `state_dict()` after k yielded batches records the cells every rank has
    consumed (ranks run in lockstep), as the pieces of the epoch left; `load_state_dict()` then yields exactly
    those cells, at any world size and number of workers. `set_epoch(e)` starts epoch e (a no-op when e is the
    epoch in progress, so a resumed epoch survives the trainer's usual `set_epoch` call). An epoch finished by
    iterating moves on to the next at the next iteration even without `set_epoch`; an epoch loaded as
    finished yields nothing until `set_epoch(e + 1)`.
    """

    def __init__(
        self,
        dataset: SomaCellDataset,
        *,
        num_workers: int,
        gene_vocab: GeneVocab,
        label_vocabs: dict[str, LabelVocab],
        fingerprint: dict[str, Any],
        epoch: int = 0,
        seed_was_given: bool = True,
        multiprocessing_context: str | None = None,
        worker_processes: bool = False,
        prefetch_factor: int = 4,
    ) -> None:
        self.dataset = dataset
        self.worker_processes = worker_processes
        self.prefetch_factor = prefetch_factor
        self.num_workers = num_workers
        self.gene_vocab = gene_vocab
        self.label_vocabs = label_vocabs
        """One vocabulary per label column, in the order of the batches' `labels` columns."""
        self._fingerprint = fingerprint
        self._seed_was_given = seed_was_given
        self._mp_context = multiprocessing_context
        self._epoch = epoch
        self._pieces: list[Piece] = dataset.order(epoch).fresh_pieces()
        self._consumed = 0
        self._complete = False
        self._finished_here = False  # the epoch was completed by iterating in this process

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def label_columns(self) -> list[str]:
        """The resolved label columns (`data.label_columns`, or the auto default found in the atlas)."""
        return list(self.label_vocabs)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_cells(self) -> int:
        """Cells matching the filter (one epoch)."""
        return self.dataset.spec.n_cells

    @property
    def num_batches(self) -> int:
        """Batches per rank in a whole epoch at this world size."""
        s = self.dataset.spec
        return rank_num_batches(
            self.num_cells, world_size=s.world_size, batch_size=s.batch_size, remainder=s.remainder
        )

    def __len__(self) -> int:
        """Batches the current (possibly resumed) pass yields in all."""
        s = self.dataset.spec
        total = sum(e - b for _, b, e in self._pieces)
        return rank_num_batches(
            total, world_size=s.world_size, batch_size=s.batch_size, remainder=s.remainder
        )

    # -- epochs and iteration --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning, unless it is the epoch in progress."""
        if epoch == self._epoch and not self._complete:
            return
        self._epoch, self._complete, self._finished_here = epoch, False, False
        self._pieces, self._consumed = self.dataset.order(epoch).fresh_pieces(), 0

    def _left(self) -> list[Piece]:
        s = self.dataset.spec
        total = sum(e - b for _, b, e in self._pieces)
        used = consumed_ranges(
            total,
            self._consumed,
            world_size=s.world_size,
            num_workers=s.num_workers,
            batch_size=s.batch_size,
            remainder=s.remainder,
        )
        return remaining(self._pieces, used)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._complete and not self._finished_here:
            # A state saved after the epoch's last batch: nothing is left of it (the trainer's next
            # `set_epoch(epoch + 1)` starts the next one).
            return
        if self._complete:
            self.set_epoch(self._epoch + 1)
        # A pass interrupted earlier continues where it stopped: re-plan the pieces left.
        self._pieces, self._consumed = self._left(), 0
        self.dataset.set_work(self._epoch, self._pieces)
        expected = len(self)
        spec = self.dataset.spec
        if self.num_workers > 0 and self.worker_processes:
            source = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                multiprocessing_context=self._mp_context,
                prefetch_factor=self.prefetch_factor,
            )
        elif self.num_workers > 0:
            source = iter_workers(spec, self._epoch, self._pieces)
        else:
            source = iter_slot(spec, self._epoch, self._pieces, 0)
        seed = cap_seed(spec, self._epoch)
        for item in source:
            batch = to_tensors(item, spec.max_tokens_per_cell, seed)
            self._consumed += 1
            if self._consumed == expected:
                self._complete = True
            yield batch
        if self._consumed != expected:
            raise RuntimeError(f"loader yielded {self._consumed} batches, expected {expected}")
        self._complete = self._finished_here = True

    # -- variants --------------------------------------------------------------------------------------
    def derive(
        self,
        *,
        shuffle: bool | None = None,
        chunk_cells: int | None = None,
        buffer_cells: int | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int | None = None,
        memory_budget_mb: int | None = None,
    ) -> SomaLoader:
        """A loader over the same cells, atlas snapshot, genes and labels in another order or partition, without
        opening the atlas again (e.g. the library-size sample, the latent-cache pass). Unset arguments keep
        this loader's values; it starts at epoch 0. A chunk size that differs from this loader's takes each new
        chunk's nnz from the old chunk holding its first cell (units stay sized by the same measurements).
        """
        s = self.dataset.spec
        chunk = s.chunk_cells if chunk_cells is None else chunk_cells
        shuffle = s.shuffle if shuffle is None else shuffle
        if chunk == s.chunk_cells:
            chunk_nnz = s.chunk_nnz
        else:
            firsts = np.arange(0, s.n_cells, chunk) // s.chunk_cells
            chunk_nnz = s.chunk_nnz[firsts] if len(s.chunk_nnz) else s.chunk_nnz
        buffer = (s.block_chunks * s.chunk_cells) if buffer_cells is None else buffer_cells
        spec = LoaderSpec(
            **{
                **s.__dict__,
                "chunk_cells": chunk,
                "chunk_nnz": chunk_nnz,
                "block_chunks": max(1, buffer // chunk) if shuffle else 1,
                "shuffle": shuffle,
                "seed": s.seed if seed is None else int(seed),
                "batch_size": s.batch_size if batch_size is None else batch_size,
                "num_workers": s.num_workers if num_workers is None else num_workers,
                "rank": s.rank if rank is None else rank,
                "world_size": s.world_size if world_size is None else world_size,
                "memory_budget_mb": s.memory_budget_mb if memory_budget_mb is None else memory_budget_mb,
            }
        )
        return SomaLoader(
            SomaCellDataset(spec),
            num_workers=spec.num_workers,
            gene_vocab=self.gene_vocab,
            label_vocabs=self.label_vocabs,
            fingerprint=_fingerprint(spec),
            multiprocessing_context=self._mp_context,
            worker_processes=self.worker_processes,
            prefetch_factor=self.prefetch_factor,
        )

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain python (JSON-able) state: the same on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "complete": self._complete,
            "pieces": [list(p) for p in self._left()],
            "cells_consumed_in_epoch": self.num_cells - sum(e - b for _, b, e in self._left()),
            "fingerprint": dict(self._fingerprint),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the epoch recorded in `state` (from any world size / number of workers)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mine, theirs = dict(self._fingerprint), dict(state["fingerprint"])
        if not self._seed_was_given:  # a random seed was drawn: adopt the checkpoint's
            mine["seed"] = theirs.get("seed")
            spec = self.dataset.spec
            self.dataset.spec = LoaderSpec(**{**spec.__dict__, "seed": int(theirs["seed"])})
            self._fingerprint = mine
        bad = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if bad:
            raise ValueError(f"loader state does not match this data / config (saved, now): {bad}")
        self._epoch = int(state["epoch"])
        self._complete = bool(state["complete"])
        self._finished_here = False
        self._pieces = [tuple(int(v) for v in p) for p in state["pieces"]]
        self._consumed = 0


def _resolve_seed(cfg: SomaDataConfig, seed: int | None, world_size: int) -> tuple[int, bool]:
    chosen = cfg.seed if cfg.seed is not None else seed
    if chosen is not None:
        return int(chosen), True
    if cfg.shuffle and world_size > 1:
        raise ValueError("data.seed must be set when shuffling on more than one rank (ranks must agree)")
    drawn = int(np.random.SeedSequence().entropy % 2**31)
    logger.info("data.seed is unset: drew shuffle seed %d", drawn)
    return drawn, False


def build_loader(
    cfg: SomaDataConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    gene_vocab: GeneVocab | None = None,
    label_vocabs: dict[str, LabelVocab] | None = None,
    value_filter: str | None = _FROM_CONFIG,
    atlas_uri: str | None = None,
    seed: int | None = None,
    epoch: int = 0,
    shuffle: bool | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    multiprocessing_context: str | None = None,
) -> SomaLoader:
    """Open the atlas, check it, select the cells and return this rank's `SomaLoader`.

    Args:
        cfg: the data section.
        rank, world_size: default to `scldm_scale.utils.env` (never torch.distributed).
        gene_vocab: a checkpoint's vocabulary; None builds it from the atlas var (`build_gene_vocab`).
        label_vocabs: the training label vocabularies; None builds them from obs of this filter. Their
            columns are the label columns when `data.label_columns` is null (auto).
        value_filter: obs filter; default `data.value_filter` (pass `cfg.val_value_filter` for validation).
        atlas_uri: overrides `data.atlas_uri` (e.g. the resolved demo atlas path).
        seed: used when `data.seed` is unset (e.g. the training seed).
        shuffle, batch_size, num_workers: override the config (e.g. an unshuffled validation loader).
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    vf = cfg.value_filter if value_filter is _FROM_CONFIG else value_filter
    shuffle = cfg.shuffle if shuffle is None else shuffle
    batch_size = cfg.micro_batch_size if batch_size is None else batch_size
    num_workers = cfg.num_workers if num_workers is None else num_workers
    seed_value, seed_given = _resolve_seed(cfg, seed, world_size) if shuffle else (0, True)
    uri = atlas_uri or cfg.atlas_uri
    opened = _select(cfg, uri, vf, gene_vocab, label_vocabs, check_filter=value_filter is not _FROM_CONFIG)
    block_chunks = max(1, cfg.shuffle_buffer_cells // cfg.shuffle_chunk_cells) if shuffle else 1
    spec = LoaderSpec(
        uri=uri,
        s3_endpoint_url=cfg.s3_endpoint_url,
        s3_verify_tls=cfg.s3_verify_tls,
        tiledb_timestamp=opened.snapshot,
        measurement_name=cfg.measurement_name,
        layer_name=cfg.layer_name,
        index=opened.cells.index,
        label_vocabs=tuple(opened.cells.label_vocabs.values()),
        chunk_nnz=opened.cells.chunk_nnz,
        var_to_token=opened.var_to_token,
        batch_size=batch_size,
        chunk_cells=cfg.shuffle_chunk_cells,
        block_chunks=block_chunks,
        shuffle=shuffle,
        seed=seed_value,
        remainder=cfg.remainder,
        max_tokens_per_cell=cfg.max_tokens_per_cell,
        memory_budget_mb=cfg.memory_budget_mb,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
    spec = LoaderSpec(**{**spec.__dict__, "node_cache": layout_for(spec, opened.version, cfg.node_cache_dir)})
    _log_loader(spec, opened, vf)
    return SomaLoader(
        SomaCellDataset(spec),
        num_workers=num_workers,
        gene_vocab=opened.gene_vocab,
        label_vocabs=opened.cells.label_vocabs,
        fingerprint=_fingerprint(spec),
        epoch=epoch,
        seed_was_given=seed_given,
        multiprocessing_context=multiprocessing_context,
        worker_processes=cfg.worker_processes,
        prefetch_factor=cfg.prefetch_factor,
    )


@dataclass
class _Opened:
    """What `build_loader` reads from the atlas, once, at one committed snapshot."""

    gene_vocab: GeneVocab
    var_to_token: np.ndarray
    cells: CellSelection
    snapshot: int | None
    version: str
    """What identifies the data read (the node cache's key): the committed ingest's timestamp, or X's nnz for an
    atlas without one; empty with the cache off."""


def _select(
    cfg: SomaDataConfig,
    uri: str,
    vf: str | None,
    gene_vocab: GeneVocab | None,
    label_vocabs: dict[str, LabelVocab] | None,
    *,
    check_filter: bool,
) -> _Opened:
    """Open and check the atlas, map its var to tokens and select the cells (`cells.select_cells`)."""
    with open_experiment(cfg, uri) as exp:
        obs_cols = list(exp.obs.schema.names)
        label_columns = resolve_label_columns(cfg, obs_cols, label_vocabs)
        if check_filter and vf not in (cfg.value_filter, cfg.val_value_filter):
            problems = check_value_filter("value_filter", vf, obs_cols, uri)
            if problems:
                raise ConfigError("; ".join(problems))
        var = _read_var(exp, cfg)
        gene_vocab = _vocab_from_var(exp, cfg, var) if gene_vocab is None else gene_vocab
        var_to_token = gene_vocab.var_to_token(var["feature_id"].tolist(), var["soma_joinid"].to_numpy())
        if not (var_to_token > 0).any():
            raise NoSharedGenesError(f"no gene of the atlas var {uri!r} is in the gene vocabulary (feature_id keys)")
        cells = select_cells(
            exp,
            exp.ms[cfg.measurement_name].X[cfg.layer_name],
            vf,
            label_columns=label_columns,
            chunk_cells=cfg.shuffle_chunk_cells,
            label_vocabs=label_vocabs,
        )
        committed, version = exp.metadata.get(COMMITTED_TIMESTAMP_KEY), ""
        if cfg.node_cache_dir is not None:  # the cache's key (X's nnz reads every fragment's metadata)
            x = exp.ms[cfg.measurement_name].X[cfg.layer_name]
            version = f"committed:{int(committed)}" if committed is not None else f"nnz:{x.nnz}:shape:{x.shape}"
        return _Opened(gene_vocab, var_to_token, cells, exp.tiledb_timestamp_ms, version)  # workers read this


def _fingerprint(spec: LoaderSpec) -> dict[str, Any]:
    """What a saved loader state must match to be resumed: the cells (their joinids' hash) and the order."""
    return {
        "n_cells": spec.n_cells,
        "obs_joinids_sha1": spec.index.sha1,
        "chunk_cells": spec.chunk_cells,
        "block_chunks": spec.block_chunks,
        "shuffle": spec.shuffle,
        "seed": spec.seed,
    }


def _log_loader(spec: LoaderSpec, opened: _Opened, vf: str | None) -> None:
    for c, unknown in opened.cells.unknown_labels.items():
        if unknown:
            logger.info("label column %r: %d cells with unknown / null category -> id 0", c, unknown)
    if spec.n_cells == 0:
        logger.warning("value_filter %r selects no cells of %s", vf, spec.uri)
        return
    order = spec.order(0)
    logger.info(
        "loader rank %d/%d: %d cells (index: %s, %.2f B/cell), %d genes, %d batches/epoch of %d, blocks of %d "
        "chunks x %d cells, unit <= %d cells; nnz per cell from %s",
        spec.rank,
        spec.world_size,
        spec.n_cells,
        spec.index.encoding,
        spec.index.nbytes / spec.n_cells,
        opened.gene_vocab.num_genes,
        rank_num_batches(
            spec.n_cells, world_size=spec.world_size, batch_size=spec.batch_size, remainder=spec.remainder
        ),
        spec.batch_size,
        spec.block_chunks,
        spec.chunk_cells,
        spec.unit_plan(order, min(1, order.num_blocks - 1))[0],
        opened.cells.nnz_source,
    )
