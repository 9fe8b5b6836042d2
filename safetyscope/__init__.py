"""safetyscope: sparse-autoencoder features of language models as safety and toxicity data tools."""

from .backbone import Backbone
from .errors import SafetyScopeError
from .features import FeatureConfig, FeatureExtractor
from .sae import SAE, SAEConfig, load_sae

__version__ = "0.1.0"
__all__ = ["Backbone", "FeatureConfig", "FeatureExtractor", "SAE", "SAEConfig", "SafetyScopeError", "load_sae"]
