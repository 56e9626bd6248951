"""onecard: train a nanochat-class chat model from scratch on one consumer GPU."""

__version__ = "0.1.0"
