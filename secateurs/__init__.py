"""secateurs: turn one Hugging Face causal LM into a family of smaller ones by structured pruning and
knowledge distillation (the Minitron recipe), step by step or as a Kubeflow pipeline tracked in MLflow."""

__version__ = "0.1.0"
