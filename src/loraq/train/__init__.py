"""The trainer: transformers + PEFT (:mod:`.service`), served over pipes by
``python -m loraq.train`` (:mod:`.pipe`). Knows nothing of the queue's state.
"""
