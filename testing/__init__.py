"""What tests and benchmarks use to make their inputs; the library never imports it.

As orbax keeps its test utilities apart from the library (``orbax.checkpoint.test_utils``):

- :mod:`testing.gcs_emulator`: starts fake-gcs-server (the GCS emulator) on a free port.
- :mod:`testing.ft_writer`: random FT weights folders, written as NVIDIA's converter does.
- :mod:`testing.t5x_gcs`: a T5X checkpoint written to gs:// the way t5x writes one on GCS.
"""
