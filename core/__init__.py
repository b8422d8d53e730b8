"""The lower floor: the task protocol, errors and user-facing messages, data loading and the sampler.

The trainer, the tasks and the tools import from here; nothing here imports from them (tests/test_layers.py).
"""
