"""ckpt-doctor: find, prove and cure what is wrong with a fine-tuned LLaMA checkpoint."""

__version__ = "0.1.0"
