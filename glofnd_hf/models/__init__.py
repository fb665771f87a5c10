"""Model adapters: one small interface over Hugging Face CLIP-family models and open_clip models.

The Trainer only talks to a :class:`DualEncoderAdapter` (``base``): one forward giving normalised
embeddings and the logit scale, encoders for evaluation, image transform and tokenizer, and
``save`` in the family's native layout (``save_pretrained`` for Hugging Face,
``open_clip_config.json`` + weights for open_clip) so a trained model loads with the family's
own tools.

* ``hf_adapter``: :class:`HFDualEncoder` (``transformers`` CLIP-style dual encoders);
* ``open_clip_adapter``: :class:`OpenClipDualEncoder` and open_clip's Hub file names;
* ``loading``: :func:`load_dual_encoder` picks the family from a name or folder
  (:func:`infer_family`, :func:`family_of_folder`);
* ``tiny``: small randomly initialised models built fully offline (tests, CPU demo), named by
  :data:`TINY_MODEL_NAMES` (``tiny_siglip``: the SigLIP ones); ``clip_bpe``: the small CLIP
  tokenizer they use.
"""

from .base import DualEncoderAdapter, DualEncoderOutput
from .clip_bpe import build_small_clip_tokenizer
from .families import (
    ModelFamily,
    family_choices,
    family_names,
    family_of_adapter,
    get_family,
    register_family,
)
from .hf_adapter import HFDualEncoder
from .loading import family_of_folder, infer_family, load_dual_encoder
from .open_clip_adapter import (
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_SAFE_WEIGHTS_NAME,
    OPEN_CLIP_WEIGHTS_NAME,
    OpenClipDualEncoder,
)
from .tiny import (
    TINY_HF_CLIP,
    TINY_MODEL_NAMES,
    TINY_OPEN_CLIP,
    TINY_OPEN_CLIP_SIGLIP,
    TINY_SIGLIP,
    build_tiny_hf_clip,
    build_tiny_model,
    build_tiny_open_clip,
    tiny_open_clip_config,
)
from .tiny_siglip import build_tiny_hf_siglip, build_tiny_open_clip_siglip

__all__ = [
    "ModelFamily",
    "family_choices",
    "family_names",
    "family_of_adapter",
    "get_family",
    "register_family",
    "OPEN_CLIP_CONFIG_NAME",
    "OPEN_CLIP_SAFE_WEIGHTS_NAME",
    "OPEN_CLIP_WEIGHTS_NAME",
    "TINY_HF_CLIP",
    "TINY_MODEL_NAMES",
    "TINY_OPEN_CLIP",
    "TINY_OPEN_CLIP_SIGLIP",
    "TINY_SIGLIP",
    "DualEncoderAdapter",
    "DualEncoderOutput",
    "HFDualEncoder",
    "OpenClipDualEncoder",
    "build_small_clip_tokenizer",
    "build_tiny_hf_clip",
    "build_tiny_hf_siglip",
    "build_tiny_model",
    "build_tiny_open_clip",
    "build_tiny_open_clip_siglip",
    "family_of_folder",
    "infer_family",
    "load_dual_encoder",
    "tiny_open_clip_config",
]
