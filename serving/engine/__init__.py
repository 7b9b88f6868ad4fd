"""The JAX T5 serving engine: FT weights folder in, FT-convention generations out.

    from serving.engine import T5Engine, SamplingParams, GenerationResult
    engine = T5Engine.load("/models/t5/1/2-gpu", dtype="bf16")
    [res] = engine.generate([np.array([37, 8, 1])], [SamplingParams(max_output_len=32)])

Modules: weights.py (read an FT folder of any tensor-parallel size), model.py (encoder,
decoder step with key/value cache), generate.py (greedy, sampling, beam search loops),
engine.py (bucketing, grouping, the public classes).
"""

from serving.engine.engine import GenerationResult, SamplingParams, T5Engine

__all__ = ["GenerationResult", "SamplingParams", "T5Engine"]
