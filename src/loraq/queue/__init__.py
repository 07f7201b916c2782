"""The queue: the queue file's schema (:mod:`.spec`) and the SQLite state (:mod:`.store`,
with :mod:`.records` and :mod:`.migrations`). The store uses only the standard library.
"""
