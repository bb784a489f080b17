"""lipkit: CLIP-family language-image pre-training — train, evaluate, serve."""

__version__ = "0.1.0"
