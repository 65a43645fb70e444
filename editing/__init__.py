"""Knowledge editing for Hugging Face causal LMs, built on PyTorch Lightning."""
__version__ = "0.1.0"
