"""T5X checkpoints -> FasterTransformer shards, on Ray.

Data flows one way: ``t5x`` (read a checkpoint) -> ``arch`` (what model it is) -> ``plan`` (every
output file, its sources and transform; pure) -> ``run`` (one Ray task per layer) -> ``storage``
(atomic local / gs:// writes). ``ft_format`` is the FT format itself, shared with serving;
``triton_config`` writes config.pbtxt. Entry point: ``python -m ray_jobs.convert``.
"""
