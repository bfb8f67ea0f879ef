"""rankwise: an experiment system for adaptive-rank parameter-efficient fine-tuning."""

__version__ = "0.1.0"
