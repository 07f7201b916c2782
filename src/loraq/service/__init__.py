"""The OpenAI-compatible fine-tuning API under ``/v1`` of ``loraq serve``, and its API keys.

Torch-free on import: generation (:mod:`.generate`) imports torch, transformers and
PEFT in its own thread, on the first completion request. The state it keeps beside the
queue (keys, files, which key owns which job) is ``<home>/api.db`` (:mod:`.state`).
The ASGI app is :mod:`.app` (Starlette, the ``serve`` extra).
"""

from .state import ApiState, Key

__all__ = ["ApiState", "Key"]
