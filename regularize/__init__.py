"""Regularizers: loss aggregation, weight decay modes, augmentation, early stopping (dropout rates live in the
models)."""
