"""The torch side shared by the trainer and the inspector: the hot base model and its
fingerprint (:mod:`.base`), batching (:mod:`.batching`) and evaluation (:mod:`.evaluation`).
"""
