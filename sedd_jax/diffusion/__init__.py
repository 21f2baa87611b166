"""The SEDD diffusion core: noise schedules, graphs, loss, categorical draws, predictor steps
and curricula; pure, jit-able JAX functions. Import everything from here:

  from sedd_jax import diffusion
  graph = diffusion.get_graph(cfg.graph); noise = diffusion.get_noise(cfg.noise)
"""

from sedd_jax.diffusion.categorical import CATEGORICAL_DRAWS
from sedd_jax.diffusion.categorical import categorical_from_exponential
from sedd_jax.diffusion.categorical import categorical_from_uniform
from sedd_jax.diffusion.categorical import exponential_from_bits
from sedd_jax.diffusion.categorical import sample_categorical
from sedd_jax.diffusion.curriculum import Curriculum
from sedd_jax.diffusion.curriculum import biased_time
from sedd_jax.diffusion.curriculum import get_curriculum
from sedd_jax.diffusion.curriculum import ramp_factor
from sedd_jax.diffusion.curriculum import sample_time_curriculum
from sedd_jax.diffusion.curriculum import scale_sigma
from sedd_jax.diffusion.curriculum import sigma_scale_factor
from sedd_jax.diffusion.curriculum import time_bias_exponent
from sedd_jax.diffusion.graph import Absorbing
from sedd_jax.diffusion.graph import get_graph
from sedd_jax.diffusion.graph import Graph
from sedd_jax.diffusion.graph import Uniform
from sedd_jax.diffusion.loss import perturb
from sedd_jax.diffusion.loss import sample_time
from sedd_jax.diffusion.loss import score_entropy_loss
from sedd_jax.diffusion.noise import Cosine
from sedd_jax.diffusion.noise import Geometric
from sedd_jax.diffusion.noise import get_noise
from sedd_jax.diffusion.noise import LogLinear
from sedd_jax.diffusion.noise import Noise
from sedd_jax.diffusion.predictors import analytic_probs
from sedd_jax.diffusion.predictors import analytic_step
from sedd_jax.diffusion.predictors import denoise_probs
from sedd_jax.diffusion.predictors import denoise_step
from sedd_jax.diffusion.predictors import euler_probs
from sedd_jax.diffusion.predictors import euler_step
from sedd_jax.diffusion.predictors import PREDICTORS
from sedd_jax.diffusion.predictors import project
from sedd_jax.diffusion.predictors import remdm_probs
from sedd_jax.diffusion.predictors import remdm_step

__all__ = [
    "Absorbing", "Cosine", "Curriculum", "Geometric", "Graph", "LogLinear", "Noise",
    "CATEGORICAL_DRAWS", "PREDICTORS", "Uniform", "analytic_probs", "analytic_step",
    "biased_time", "categorical_from_exponential", "categorical_from_uniform", "denoise_probs",
    "denoise_step", "euler_probs", "euler_step", "exponential_from_bits", "get_curriculum",
    "get_graph", "get_noise", "perturb", "project", "ramp_factor",
    "remdm_probs", "remdm_step", "sample_categorical",
    "sample_time", "sample_time_curriculum", "scale_sigma", "score_entropy_loss",
    "sigma_scale_factor", "time_bias_exponent",
]
