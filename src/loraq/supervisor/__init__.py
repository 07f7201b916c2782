"""The supervisor, torch-free: the worker that works the queue (:mod:`.worker`) and the
atomic publishing of inspected adapters (:mod:`.publish`).
"""
