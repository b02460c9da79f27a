"""llmtop: top for PyTorch and Hugging Face transformers programs."""

__version__ = "0.1.0"
