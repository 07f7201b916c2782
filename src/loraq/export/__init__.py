"""Exports of an adapter for serving: a merged model (:mod:`.merged`) and a GGUF LoRA (:mod:`.gguf`).

Importing this package imports neither torch nor gguf: :mod:`.gguf` needs numpy and the
``gguf`` package (the ``export`` extra) and never torch; :mod:`.merged` imports torch,
transformers and peft when it runs. ``loraq export`` (:func:`loraq.api.export`) resolves
the adapter and its base, inspects the adapter first, and calls one of them.
"""
