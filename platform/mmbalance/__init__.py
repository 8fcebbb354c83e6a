"""mmbalance: imbalanced multimodal learning experiments at scale."""

__version__ = "0.1.0"
