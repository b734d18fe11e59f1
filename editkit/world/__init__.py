"""The embedded fact world: a synthetic CounterFact-style world and tiny models trained on it."""
from .tokenizer import train_tokenizer

__all__ = ["train_tokenizer"]
