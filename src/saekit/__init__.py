"""saekit: train, evaluate and apply sparse autoencoders on transformer activations."""

from saekit.config import DataConfig, SAEConfig, TrainConfig
from saekit.rules import rule_names
from saekit.sae import SAE, Codes, SAEOutput

__all__ = ["SAE", "Codes", "DataConfig", "SAEConfig", "SAEOutput", "TrainConfig", "rule_names"]
__version__ = "0.1.0"
