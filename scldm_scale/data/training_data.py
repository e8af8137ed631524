"""`TrainingData`: what a training job opened at start-up (the resolved atlas and this rank's loader), handed to
the stage-2 hand-off (`train/handoff.py`) and the end-of-run report (`eval/report.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from scldm_scale.data.loader import SomaLoader
from scldm_scale.data.vocab import GeneVocab


@dataclass
class TrainingData:
    """The resolved atlas, the training loader and its vocabularies."""

    atlas_uri: str
    """Resolved SOMA URI (the demo atlas path for "demo")."""
    loader: SomaLoader
    """This rank's training loader."""

    @property
    def gene_vocab(self) -> GeneVocab:
        return self.loader.gene_vocab

    @property
    def label_cardinalities(self) -> list[int]:
        """K_j per label column (categories 1..K_j; 0 = unknown / null)."""
        return [self.loader.label_vocabs[c].num_classes - 1 for c in self.loader.label_vocabs]
