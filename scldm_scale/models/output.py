"""`LossOutput`: what every model loss returns (scvi-tools `LossOutput`, reduced to what the loop needs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """A scalar loss to back-propagate and named detached terms to log.

    Attributes:
        loss: scalar tensor with grad.
        terms: name -> scalar tensor (detached), e.g. `nll`, `kl`; logged as `train/<name>`.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
