"""Gene and label vocabularies: feature_id -> token id (0 = padding), category -> label id (0 = unknown).

Both serialize to JSON so checkpoints carry them. No SOMA reads here: callers pass var / obs columns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

PAD_TOKEN = 0
"""Gene token id of padding."""
UNKNOWN_LABEL = 0
"""Label id of unknown / null categories (also the classifier-free-guidance null id)."""


@dataclass
class GeneVocab:
    """Ordered gene list; token id = 1 + index in `feature_ids`.

    Build it from the training atlas (`from_var`) or load it from a checkpoint (`from_json`). An atlas whose
    var differs is mapped by feature_id (`var_to_token`); its genes missing from the vocabulary are dropped.
    """

    feature_ids: list[str]
    """Gene keys in token order (token id = 1 + index)."""
    feature_names: list[str] | None = None
    """Optional display names, aligned with `feature_ids`."""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.feature_ids = [str(f) for f in self.feature_ids]
        self._index = {f: i + 1 for i, f in enumerate(self.feature_ids)}
        if len(self._index) != len(self.feature_ids):
            raise ValueError("GeneVocab.feature_ids has duplicates")
        if self.feature_names is not None and len(self.feature_names) != len(self.feature_ids):
            raise ValueError("GeneVocab.feature_names must align with feature_ids")

    @property
    def num_genes(self) -> int:
        """Genes in the vocabulary (token ids 1..num_genes)."""
        return len(self.feature_ids)

    @property
    def num_tokens(self) -> int:
        """Embedding table size: genes + the padding token."""
        return len(self.feature_ids) + 1

    def __len__(self) -> int:
        return self.num_genes

    def token_id(self, feature_id: str) -> int:
        """Token id of a gene; 0 (padding) when it is not in the vocabulary."""
        return self._index.get(str(feature_id), PAD_TOKEN)

    @classmethod
    def from_var(
        cls,
        feature_ids: Sequence[str],
        *,
        feature_names: Sequence[str] | None = None,
        n_cells: Sequence[int] | None = None,
        min_gene_cells: int = 0,
    ) -> GeneVocab:
        """Vocabulary of an atlas var, in var order; with `min_gene_cells`, only genes seen in that many cells."""
        keep = np.ones(len(feature_ids), dtype=bool)
        if min_gene_cells > 0:
            if n_cells is None:
                raise ValueError("data.min_gene_cells > 0 needs var column `n_cells` in the atlas")
            keep = np.asarray(n_cells) >= min_gene_cells
        ids = [str(f) for f, k in zip(feature_ids, keep) if k]
        names = None if feature_names is None else [str(n) for n, k in zip(feature_names, keep) if k]
        if not ids:
            raise ValueError(f"data.min_gene_cells={min_gene_cells} keeps no gene of the atlas var")
        return cls(ids, names)

    def var_to_token(
        self, var_feature_ids: Sequence[str], var_joinids: Sequence[int] | None = None
    ) -> np.ndarray:
        """Lookup array indexed by var soma_joinid -> token id (0 = gene not in the vocabulary, dropped).

        Logs once how many atlas genes are dropped.
        """
        joinids = (
            np.arange(len(var_feature_ids)) if var_joinids is None else np.asarray(var_joinids, np.int64)
        )
        lut = np.zeros(int(joinids.max()) + 1 if len(joinids) else 0, dtype=np.int32)
        tokens = np.fromiter(
            (self._index.get(str(f), PAD_TOKEN) for f in var_feature_ids), np.int32, len(joinids)
        )
        lut[joinids] = tokens
        dropped = int((tokens == PAD_TOKEN).sum())
        if dropped:
            logger.info(
                "%d of %d atlas genes are not in the gene vocabulary and are dropped", dropped, len(tokens)
            )
        return lut

    def to_json(self) -> str:
        """JSON text (checkpoints carry it)."""
        return json.dumps({"feature_ids": self.feature_ids, "feature_names": self.feature_names})

    @classmethod
    def from_json(cls, text: str) -> GeneVocab:
        """Inverse of `to_json`."""
        obj = json.loads(text)
        return cls(obj["feature_ids"], obj.get("feature_names"))


@dataclass
class LabelVocab:
    """Categories of one obs column; label id = 1 + index in `categories`, 0 = unknown / null."""

    column: str
    """obs column name."""
    categories: list[str]
    """Sorted category list."""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.categories = [str(c) for c in self.categories]
        self._index = {c: i + 1 for i, c in enumerate(self.categories)}

    @property
    def num_classes(self) -> int:
        """Label ids used, the unknown id 0 included."""
        return len(self.categories) + 1

    @classmethod
    def from_values(cls, column: str, values: Sequence | pa.Array | pa.ChunkedArray) -> LabelVocab:
        """Sorted distinct non-null values of a column (nulls map to the unknown id)."""
        return cls(column, sorted(cls.distinct(values)))

    @staticmethod
    def distinct(values: Sequence | pa.Array | pa.ChunkedArray) -> set[str]:
        """Distinct non-null values as the category strings `encode` matches (collect them slice by slice)."""
        cats, _ = _dictionary(values)
        return {c for c in cats if c is not None}

    def encode(self, values: Sequence | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
        """Label ids of `values` and the number of unknown / null values (mapped to 0)."""
        cats, indices = _dictionary(values)
        lut = np.array(
            [self._index.get(c, UNKNOWN_LABEL) if c is not None else UNKNOWN_LABEL for c in cats]
            + [UNKNOWN_LABEL],
            dtype=np.int64,
        )
        out = lut[indices]
        return out, int((out == UNKNOWN_LABEL).sum())

    def to_json(self) -> str:
        """JSON text (checkpoints carry it)."""
        return json.dumps({"column": self.column, "categories": self.categories})

    @classmethod
    def from_json(cls, text: str) -> LabelVocab:
        """Inverse of `to_json`."""
        obj = json.loads(text)
        return cls(obj["column"], obj["categories"])


def _dictionary(values: Sequence | pa.Array | pa.ChunkedArray) -> tuple[list[str | None], np.ndarray]:
    """(distinct values as strings, index of each value; nulls -> len(distinct)) via arrow, no python loop."""
    if isinstance(values, pa.ChunkedArray):
        arr = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    elif isinstance(values, pa.Array):
        arr = values
    else:
        try:
            arr = pa.array(list(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array([None if v is None else str(v) for v in values], pa.string())
    if pa.types.is_null(arr.type):
        arr = arr.cast(pa.string())
    if not pa.types.is_dictionary(arr.type):
        if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
            arr = pc.cast(arr, pa.string())
        arr = pc.dictionary_encode(arr)
    cats = [None if c is None else str(c) for c in arr.dictionary.to_pylist()]
    indices = arr.indices.fill_null(len(cats)).to_numpy(zero_copy_only=False).astype(np.int64)
    return cats, indices
