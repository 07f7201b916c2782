"""Where trainers run: a process per device on this machine (:mod:`.local`) or a Ray actor
per GPU (:mod:`.ray`, with :mod:`.ray_actor`), behind one protocol (:mod:`.base`).
Torch-free; only the Ray actor imports the trainer, inside the actor's process.
"""
