"""RAEE Serve: Retrieval-Augmented Early Exiting (arXiv 2405.15198) as an inference service."""

__version__ = "0.1.0"
