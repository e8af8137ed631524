"""Generation through the prior and the decoder: latents by the flow-matching ODE (with classifier-free
guidance), then NB parameters, then integer counts, with library sizes drawn from the per-condition log-normal
statistics of the training cells (never from real cells).

Every random draw of cell i (its ODE start, its library size, its counts) comes from a generator seeded by
(seed, i), and cells are computed in fixed batches of global indices, so a seed gives the same cells whatever
the batch a rank runs and whatever the number of ranks. Single-device.

Shape legend: B cells, K label columns, G genes, M latent tokens, L latent dim.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scldm_scale.data.stats import LibrarySizeStats
from scldm_scale.data.vocab import LabelVocab
from scldm_scale.flow.samplers import sample_ode
from scldm_scale.models.latent import LatentStats
from scldm_scale.models.vae.likelihood import sample_nb
from scldm_scale.models.vae.model import TransformerVAE

COUNT_COLUMN = "n"
"""Column (CSV) or key (condition strings) holding the number of cells of a condition."""


def cell_seed(seed: int, index: int) -> int:
    """The seed of cell `index` of a generation run seeded `seed` (independent streams per cell)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


def cell_noise(seed: int, indices: Sequence[int], latent_shape: Sequence[int]
               ) -> tuple[list[torch.Generator], torch.Tensor, torch.Tensor]:
    """Per-cell generators and the first draws of each: the ODE start (B, M, L) and a standard normal (B,)
    for the library size; the generators go on to draw the counts."""
    gens = [torch.Generator().manual_seed(cell_seed(seed, i)) for i in indices]
    x0 = torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in gens])
    eps = torch.cat([torch.randn(1, generator=g, dtype=torch.float64) for g in gens])
    return gens, x0, eps


# ---------------------------------------------------------------------------------------------- conditions
@dataclass
class Condition:
    """A label row to generate (`labels[j]` = id in column j, 0 = free) and how many cells."""

    labels: tuple[int, ...]
    count: int


def _encode_row(values: dict[str, str], label_vocabs: dict[str, LabelVocab], source: str) -> tuple[int, ...]:
    unknown = [k for k in values if k not in label_vocabs]
    if unknown:
        raise ValueError(f"{source}: {unknown} are not label columns of this model (it has {list(label_vocabs)})")
    row = []
    for col, vocab in label_vocabs.items():
        value = values.get(col)
        if value is None or value == "":
            row.append(0)
            continue
        if value not in vocab.categories:
            shown = vocab.categories[:8]
            raise ValueError(f"{source}: {col}={value!r} was not seen in training; known values start with {shown}")
        row.append(vocab.categories.index(value) + 1)
    return tuple(row)


def parse_condition(spec: str, label_vocabs: dict[str, LabelVocab]) -> Condition:
    """`"col=value,col=value:count"` (columns left out are free; `:count` defaults to 1).

    Example: `"dataset_id=pbmc700,cell_type=CD19+ B:200"`. Values with `,` or `:` need the CSV form.
    """
    body, _, count = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    values = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"condition {spec!r}: {part!r} is not col=value")
        values[key.strip()] = value.strip()
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"condition {spec!r}: the count after ':' must be an integer, got {count!r}") from None
    if n < 0:
        raise ValueError(f"condition {spec!r}: the count must be >= 0")
    return Condition(_encode_row(values, label_vocabs, f"condition {spec!r}"), n)


def read_conditions_csv(path: str | Path, label_vocabs: dict[str, LabelVocab]) -> list[Condition]:
    """A CSV with some label columns and a count column `n`; one condition per row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"conditions CSV {path} does not exist")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or COUNT_COLUMN not in rows[0]:
        raise ValueError(f"{path}: needs a header with label columns and a count column {COUNT_COLUMN!r}")
    out = []
    for i, row in enumerate(rows, start=2):
        try:
            n = int(row.pop(COUNT_COLUMN))
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {i}: column {COUNT_COLUMN!r} must be an integer") from None
        out.append(Condition(_encode_row(row, label_vocabs, f"{path} line {i}"), n))
    return out


def parse_conditions_all(specs: Sequence[str], csv_path: str | None,
                         label_vocabs: dict[str, LabelVocab]) -> list[Condition]:
    """Conditions from `"col=value,...:count"` strings or a CSV (one of the two)."""
    if csv_path is not None:
        return read_conditions_csv(csv_path, label_vocabs)
    return [parse_condition(s, label_vocabs) for s in specs]


def expand_conditions(conditions: Sequence[Condition], num_columns: int) -> torch.Tensor:
    """(N, K) int64 label rows, each condition repeated `count` times, in the order given."""
    rows = [c.labels for c in conditions for _ in range(c.count)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), num_columns)


def check_partial_rows(labels_NK: np.ndarray, label_columns: list[str], seen_rows: set[tuple[int, ...]],
                       trained_joint: bool, strategy: str) -> None:
    """Joint guidance conditions on the whole label row. A model trained with joint dropout saw only whole
    rows and the all-null row, so a partly free row is outside what it learnt unless such rows occur in the
    training data (`seen_rows`). Such requests are refused, naming the row and the fixes.

    Raises:
        ValueError: for the first partly free row the model has not seen.
    """
    if strategy != "joint" or not trained_joint or labels_NK.shape[1] < 2:
        return
    for row in np.unique(labels_NK, axis=0):
        free = row == 0
        if free.any() and not free.all() and tuple(int(v) for v in row) not in seen_rows:
            named = [c for c, f in zip(label_columns, free) if f]
            raise ValueError(
                f"condition {dict(zip(label_columns, row.tolist()))} leaves {named} free: with joint guidance this "
                "model (trained with joint dropout) has seen only whole label rows and the all-null row; give every "
                "label column, or sample with sampling.guidance=additive"
            )


def decode_labels(labels_NK: np.ndarray, label_vocabs: dict[str, LabelVocab]) -> dict[str, list[str | None]]:
    """Label ids back to values per column (None for 0 = free / unknown)."""
    out = {}
    for j, (col, vocab) in enumerate(label_vocabs.items()):
        cats = [None, *vocab.categories]
        out[col] = [cats[int(v)] for v in labels_NK[:, j]]
    return out


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_latents(
    dit: nn.Module,
    labels: torch.Tensor | None,
    num_cells: int | None = None,
    *,
    x0: torch.Tensor | None = None,
    sampler: str = "heun",
    num_steps: int = 50,
    guidance_weights: Sequence[float] | None = None,
    strategy: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    latent_stats: LatentStats | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents (B, M, L) by the ODE from `x0` (or fresh noise); labels (B, K), or None for unconditional."""
    was_training = dit.training
    dit.eval()
    device = next(dit.parameters()).device
    B = labels.shape[0] if labels is not None else (num_cells if x0 is None else x0.shape[0])
    if B is None:
        raise ValueError("sample_latents needs labels, num_cells or x0")
    if x0 is None:
        x0 = torch.randn((B, dit.num_tokens, dit.latent_dim), generator=generator, device="cpu")
    x0 = x0.to(device)
    labels = labels.to(device) if labels is not None else None

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit.forward_with_guidance(x, t, labels, guidance_weights, strategy)

    z = sample_ode(velocity, x0, sampler, num_steps, atol, rtol)
    dit.train(was_training)
    return latent_stats.denormalize(z) if latent_stats is not None else z


def sample_counts(params: dict[str, torch.Tensor], generators: Sequence[torch.Generator],
                  library_size: torch.Tensor, target_sum: float) -> torch.Tensor:
    """Integer counts (B, G) from decoder parameters, row i drawn with `generators[i]`.

    NB: Gamma-Poisson draws. Gaussian head: the rounded mean reconstruction expm1(mean) L / target_sum.
    """
    if "mu" not in params:
        scale = library_size.unsqueeze(-1) / target_sum
        return (torch.expm1(params["mean"]).clamp_min(0) * scale).round()
    mu, theta = params["mu"].cpu(), params["theta"].cpu()
    rows = [
        sample_nb(mu[i : i + 1], theta if theta.shape[0] == 1 else theta[i : i + 1], g)
        for i, g in enumerate(generators)
    ]
    return torch.cat(rows)


@torch.no_grad()
def generate_cells(
    dit: nn.Module,
    vae: TransformerVAE,
    library_size_stats: LibrarySizeStats | None,
    labels: torch.Tensor | None,
    indices: Sequence[int],
    *,
    seed: int,
    gene_ids: torch.Tensor | None = None,
    gene_chunk_size: int | None = None,
    library_size: torch.Tensor | None = None,
    **sample_kwargs,
) -> dict[str, torch.Tensor]:
    """Generate the cells with global `indices` (B,) of a run seeded `seed`: latents -> NB -> counts.

    Args:
        dit: velocity network (EMA weights for the usual choice).
        vae: frozen stage-1 model.
        library_size_stats: per-condition log-normal library sizes (from the checkpoint manifest).
        labels: (B, K) conditions (0 = free attribute), or None for unconditional generation.
        indices: the cells' global indices; cell i's draws depend only on (seed, i).
        gene_ids: genes to decode ((G,) ids); None = the whole vocabulary.
        library_size: (B,) depths to decode at instead of drawing them (e.g. to reconstruct known cells).
        **sample_kwargs: sampler, num_steps, guidance_weights, strategy, atol, rtol, latent_stats.

    Returns:
        {"z" (B, M, L) as the decoder sees it, "library_size" (B,), "counts" (B, G)} on CPU, plus the decoder
        parameters ("mu", "theta" for NB; "mean" for the Gaussian head).
    """
    vae.eval()
    gens, x0, eps = cell_noise(seed, indices, (dit.num_tokens, dit.latent_dim))
    z = sample_latents(dit, labels, x0=x0, **sample_kwargs)
    if library_size is None:
        library_size = library_size_stats.sample(None if labels is None else labels.cpu().numpy(), eps.numpy())
    library_size = library_size.float().cpu()
    params = vae.decode(z, library_size.to(z.device), gene_ids=gene_ids, gene_chunk_size=gene_chunk_size)
    counts = sample_counts(params, gens, library_size, vae.cfg.gaussian_target_sum)
    return {"z": z.cpu(), "library_size": library_size, "counts": counts,
            **{k: v.cpu() for k, v in params.items()}}


@torch.no_grad()
def generate(
    dit: nn.Module,
    vae: TransformerVAE,
    labels: torch.Tensor | None,
    *,
    num_cells: int | None = None,
    library_size_stats: LibrarySizeStats | None = None,
    library_size: torch.Tensor | None = None,
    seed: int = 0,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Generate one batch of cells: indices 0..B-1 of a run seeded `seed` (see `generate_cells`)."""
    B = labels.shape[0] if labels is not None else num_cells
    if B is None:
        raise ValueError("generate needs labels or num_cells")
    if library_size_stats is None and library_size is None:
        raise ValueError("generate needs library_size_stats or library_size")
    return generate_cells(dit, vae, library_size_stats, labels, range(B), seed=seed, library_size=library_size,
                          **kwargs)
