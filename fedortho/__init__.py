"""fedortho: private federated fine-tuning of LoRA adapters (FedSVD, FFA-LoRA, FedAvg-LoRA).

The library holds the mathematics and the training; it never imports Flower. The Flower
apps live in the top-level packages ``server`` and ``client`` and call into this package.
"""

__version__ = "0.1.0"
