"""Flow matching: the linear path, the velocity loss (network as a callable) and ODE samplers."""

from scldm_scale.flow.loss import flow_matching_loss
from scldm_scale.flow.path import LinearPath
from scldm_scale.flow.samplers import dopri5, euler, heun, sample_ode

__all__ = ["LinearPath", "dopri5", "euler", "flow_matching_loss", "heun", "sample_ode"]
