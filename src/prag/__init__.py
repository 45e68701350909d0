"""prag: Parametric Retrieval-Augmented Generation (Su et al., SIGIR 2025) on any Hugging Face causal LM."""

from .config import Config
from .corpus import Passage
from .pipeline import ALL_MODES, CONTROLS, MODES, Answer, Pipeline

__all__ = ["ALL_MODES", "CONTROLS", "MODES", "Answer", "Config", "Passage", "Pipeline"]
__version__ = "0.1.0"
