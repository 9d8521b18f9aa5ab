"""Rectified flow, the SD3 paper's other formulations, timestep densities, shift and samplers.

Esser et al. 2024 ("Scaling Rectified Flow Transformers", sections 2-3, appendix B) write every
formulation as a forward process z_t = a(t) x0 + b(t) eps, t in [0, 1], t = 0 data, t = 1 noise,
plus a network output, a target and a weighting. This module owns all of it, for training and
sampling alike, so that the two can never disagree (shift applied twice, wrong weighting, ...).

Formulations (`get_formulation`): rf (the default), eps_linear (LDM), v_cosine, edm. Densities
(`get_density`): uniform, logit_normal(m, s), mode(s), cosmap; `shift_time` moves any of them.

The straight frame. Dividing z_t by a + b gives x = (1 - s) x0 + s eps with s = b / (a + b): every
formulation is rectified flow run on another clock (s(t)) and at another scale (a + b). The
samplers integrate each formulation's probability-flow ODE in this frame, on the rf noise levels s
of diffusers' FlowMatchEulerDiscreteScheduler (`sigmas`), converting the network output through the
formulation's own (a, b). Hence one code path for every formulation, the same noise levels for all,
Euler == DDIM for every formulation and == diffusers' flow-match Euler for rf, and a terminal step
to s = 0 that is the x0 prediction (finite for every formulation, no division by b(0) = 0).

Everything computes in float32 and is jit- and vmap-able.
"""
from sd3jax.flow.formulations import (EDM, FORMULATIONS, EpsLinear, Formulation, RectifiedFlow,
                                     VCosine, get_formulation, loss, training_inputs)
from sd3jax.flow.samplers import autoguide, cfg, sample, sigmas
from sd3jax.flow.timesteps import (DENSITIES, T_EPS, CosMap, Density, LogitNormal, Mode, Shifted,
                                   Uniform, get_density, plot_densities, resolution_shift,
                                   shift_time)

__all__ = [
    "CosMap", "DENSITIES", "Density", "EDM", "EpsLinear", "FORMULATIONS", "Formulation",
    "LogitNormal", "Mode", "RectifiedFlow", "Shifted", "T_EPS", "Uniform", "VCosine", "autoguide",
    "cfg", "get_density", "get_formulation", "loss", "plot_densities", "resolution_shift", "sample",
    "shift_time", "sigmas", "training_inputs",
]
