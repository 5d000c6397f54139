"""northstar: a closed-loop two-tower recommender served on Triton Inference Server."""

__version__ = "0.1.0"
