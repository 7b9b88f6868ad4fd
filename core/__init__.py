"""The core every stage stands on; it imports nothing else of this repository.

- :mod:`core.t5config`: the model description (one ``T5Config``).
- :mod:`core.ft_format`: the FasterTransformer file format and its split rules.
- :mod:`core.repository`: the model repository: its layout, config.pbtxt, and
  ``ConvertedModel``, the one reader of config.pbtxt and config.ini every stage asks.
- :mod:`core.manifest`: manifest.json (write, verify, digest).
- :mod:`core.storage`: one interface for local paths and gs:// URLs (atomic, bounded-memory).
- :mod:`core.gcs_env`: where GCS is (real or the emulator), for google-cloud-storage and
  tensorstore (the emulator itself is started by ``testing.gcs_emulator``).
- :mod:`core.scratch`: scratch files with an owner, removed once their owner is gone.
- :mod:`core.options`: ``StageOptions``, the base of every stage's options model and its checks.
- :mod:`core.errors`: ``UserError``, every refusal a user can fix, and how it reads as one line.
- :mod:`core.cli`: how every command ends: the summary on stdout, errors caught in one place.
"""
