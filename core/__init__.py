"""The core every stage stands on; it imports nothing else of this repository.

- :mod:`core.t5config`: the model description (one ``T5Config``).
- :mod:`core.ft_format`: the FasterTransformer file format, its split rules and the manifest.
- :mod:`core.repository`: the Triton model repository (config.pbtxt, the JAX model's model.py).
- :mod:`core.storage`: one interface for local paths and gs:// URLs (atomic, bounded-memory).
- :mod:`core.gcs_env`: where GCS is (real or the emulator), for google-cloud-storage and tensorstore.
- :mod:`core.scratch`: scratch files with an owner, removed once their owner is gone.
- :mod:`core.errors`: the errors users see as one line.
"""
