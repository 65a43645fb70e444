"""Knowledge editing for Hugging Face causal LMs, built on PyTorch Lightning."""
__version__ = "0.1.0"

import warnings

# In a notebook without ipywidgets, tqdm.auto (imported by transformers and by editing.console) warns
# and falls back to the text bar, which is what we want there.
warnings.filterwarnings("ignore", message="IProgress not found")
