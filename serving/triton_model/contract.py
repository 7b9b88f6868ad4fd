"""The FT T5 request contract now lives in :mod:`serving.engine.contract` (in-process evaluation
uses it too, through serving.engine's public API); this name stays for the Triton model and its
tests."""

from serving.engine.contract import (  # noqa: F401 - re-exported names
    KNOWN_INPUTS,
    MAX_BEAM_WIDTH,
    MAX_OUTPUT_LEN_LIMIT,
    PER_ROW_INPUTS,
    WORD_LIST_INPUTS,
    ParsedRequest,
    RequestError,
    assemble_outputs,
    parse_request,
)
