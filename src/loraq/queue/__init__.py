"""The queue: the queue file's schema (:mod:`.spec`) and the SQLite state (:mod:`.store`,
with :mod:`.records`, :mod:`.migrations`, :mod:`.dbfile` and :mod:`.listing`). The store
uses only the standard library.
"""
