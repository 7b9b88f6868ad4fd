"""The JAX T5 serving engine: FT weights folder in, FT-convention generations out.

    from serving.engine import T5Engine, SamplingParams, GenerationResult
    engine = T5Engine.load("/models/t5/1/2-gpu", dtype="bf16")
    [res] = engine.generate([np.array([37, 8, 1])], [SamplingParams(max_output_len=32)])

Modules: weights.py (read an FT folder of any tensor-parallel size), model.py (encoder,
decoder step with key/value cache), generate.py (greedy, sampling, beam search loops),
engine.py (bucketing, grouping, the public classes), contract.py (the FT T5 request tensors
<-> rows and SamplingParams, shared by the Triton model and in-process evaluation).
"""

from serving.engine.contract import ParsedRequest, RequestError, assemble_outputs, parse_request
from serving.engine.engine import GenerationResult, SamplingParams, T5Engine

__all__ = ["GenerationResult", "ParsedRequest", "RequestError", "SamplingParams", "T5Engine",
           "assemble_outputs", "parse_request"]
