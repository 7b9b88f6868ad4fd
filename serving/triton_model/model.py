"""Triton Python-backend model answering the FT T5 request contract with the JAX engine.

A model repository written by ``ray_jobs.convert --engine jax`` holds
``<model>/1/model.py`` = ``from serving.triton_model.model import TritonPythonModel``, and a
``config.pbtxt`` with ``backend: "python"``, dynamic batching and the string parameters
``weights_dir`` (``<T>-gpu``), ``data_type`` and ``max_input_len``.

Every row of every request in a dynamic batch goes to the engine in one ``generate`` call (the
engine groups rows it can run together); each request gets its own response, or a TritonError
naming what is wrong with it, and the other requests of the batch are still answered.

Every tensor crosses the Triton/Python boundary through DLPack, both ways, the small per-row
settings too: inputs with ``jax.numpy.from_dlpack(tensor)``, outputs with
``pb_utils.Tensor.from_dlpack(name, jax_array)``. The stub's numpy bridge (``as_numpy()``,
``pb_utils.Tensor(name, ndarray)``) predates numpy 2: under it, inputs read that way hold the
first element everywhere and outputs built that way arrive empty. DLPack is right under numpy 2
(docs/triton-numpy2.md).

Where the data lives: Triton hands the model host tensors (the instance group is KIND_CPU); the
contract checks them on the host, and the engine puts each dynamic batch's padded token matrix
on its device (the GPU when JAX has one) in one transfer, not one per tensor. Decoded results
come back to the host to be split per request, so the outputs are host (CPU-device) jax arrays:
putting them on the GPU only for Triton to copy them back would cost two copies per response.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import triton_python_backend_utils as pb_utils

from core.repository import ConvertedModel
from serving.engine import T5Engine
from serving.engine.contract import (
    ParsedRequest,
    RequestError,
    assemble_outputs,
    parse_request,
)


class TritonPythonModel:
    """Triton calls ``initialize`` once per instance, ``execute`` per dynamic batch."""

    def initialize(self, args: dict[str, str]) -> None:
        """Triton's load hook: read config.pbtxt (core.repository's handle) and load the engine.

        ``model_repository`` is the model's own folder, ``<repository>/<name>``.
        """
        folder = Path(args["model_repository"])
        model = ConvertedModel.open(str(folder.parent), folder.name, str(args["model_version"]))
        weights_dir = model.weights_dir
        if not Path(model.config_ini_url).is_file():
            raise pb_utils.TritonModelException(
                f"no FT weights folder at {weights_dir} (config.ini missing); check the "
                f"weights_dir parameter of {model.config_url}"
            )
        dtype = model.data_type
        self.max_batch_size = model.max_batch_size
        self.engine = T5Engine.load(weights_dir, dtype=dtype, max_batch=self.max_batch_size)
        self.vocab_size = self.engine.config.vocab_size
        self.end_id = self.engine.config.eos_token_id
        self.max_input_len = T5Engine.input_limit(model.max_input_len)
        self.output_names = {o.name for o in model.config.output}
        # Outputs are built on the host device (see the module docstring).
        self.host = jax.devices("cpu")[0]
        self.device = next(iter(jax.tree_util.tree_leaves(self.engine.params)[0].devices()))
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"T5 engine loaded from {weights_dir} ({dtype}) on {self.device}; "
            f"max_input_len {self.max_input_len}"
        )

    def execute(self, requests: list) -> list:
        """One response per request, in order."""
        responses: list = [None] * len(requests)
        parsed: dict[int, ParsedRequest] = {}
        for i, request in enumerate(requests):
            try:
                inputs = {t.name(): self._read(t) for t in request.inputs()}
                parsed[i] = parse_request(inputs, max_input_len=self.max_input_len,
                                          vocab_size=self.vocab_size,
                                          max_batch_size=self.max_batch_size)
            except RequestError as exc:
                responses[i] = self._error(str(exc), invalid_argument=True)
        if parsed:
            try:
                results = self._generate(list(parsed.values()))
                for i, result in zip(parsed, results, strict=True):
                    responses[i] = self._response(parsed[i], result)
            except Exception as exc:  # noqa: BLE001
                # One bad request must not fail the others batched with it: answer each alone.
                self.logger.log_warn(f"batched generate failed ({exc}); retrying per request")
                for i, req in parsed.items():
                    try:
                        responses[i] = self._response(req, self._generate([req])[0])
                    except Exception as one:  # noqa: BLE001 - reported to that client
                        responses[i] = self._error(f"generation failed: {one}")
        return responses

    @staticmethod
    def _read(tensor) -> np.ndarray:
        """One input tensor through DLPack (the tensor object itself: current jax refuses a raw
        capsule); the contract reads its host view, a copy only if it was on a GPU.

        64-bit mode for the call: without it JAX narrows a UINT64 ``random_seed`` to 32 bits.
        """
        with jax.enable_x64(True):
            return np.asarray(jnp.from_dlpack(tensor))

    def _generate(self, reqs: list[ParsedRequest]) -> list[list]:
        """All rows of ``reqs`` in one engine call; the results split back per request."""
        tokens = [t for r in reqs for t in r.tokens]
        params = [p for r in reqs for p in r.params]
        flat = self.engine.generate(tokens, params)
        out, start = [], 0
        for r in reqs:
            out.append(flat[start:start + r.batch])
            start += r.batch
        return out

    def _response(self, req: ParsedRequest, results: list):
        arrays = assemble_outputs(req, results, self.end_id)
        tensors = [pb_utils.Tensor.from_dlpack(name, jax.device_put(a, self.host))
                   for name, a in arrays.items()
                   if not self.output_names or name in self.output_names]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(message: str, invalid_argument: bool = False):
        """An error response; contract violations carry INVALID_ARG (HTTP 400), not INTERNAL."""
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
        error = pb_utils.TritonError(message, code) if code is not None \
            else pb_utils.TritonError(message)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def finalize(self) -> None:
        """Triton's unload hook: drop the engine (its device buffers go with it)."""
        self.engine = None
