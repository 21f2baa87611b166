"""The SEDD transformer (DDiT) in Flax NNX, its attention backends and PyTorch weight import."""

from sedd_jax.model.attention import dot_product_attention
from sedd_jax.model.ddit import DDiT
from sedd_jax.model.torch_import import (StateDictError, export_state_dict, import_state_dict,
                                         infer_model_config)

__all__ = ["DDiT", "dot_product_attention", "StateDictError", "export_state_dict",
           "import_state_dict", "infer_model_config"]
