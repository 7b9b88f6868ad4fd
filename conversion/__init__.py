"""T5X checkpoints -> FasterTransformer shards, on Ray.

Data flows one way: ``t5x`` (read a checkpoint) -> ``arch`` (what model it is) -> ``plan`` (every
output file, its sources and transform; pure) -> ``run`` (one Ray task per layer) -> ``storage``
(atomic local / gs:// writes). ``core.ft_format`` is the FT format itself, shared with
serving; ``core.repository`` writes config.pbtxt and lays out the repository. Entry point:
``python -m ray_jobs.convert``.
"""
