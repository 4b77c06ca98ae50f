"""Classifier heads on stored embeddings: fit, evaluate, report, model files."""
