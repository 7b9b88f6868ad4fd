"""What tritonserver answers to a fixed set of requests, saved to .npz, to compare checkouts or
dependency sets (issue 13: numpy 1.26 + the stub's numpy bridge vs numpy 2 + DLPack).

A tiny model repository from seeded random FT weights (the test fixtures' writer, which
numpy 1.26 and 2.x fill identically), one tritonserver on CPU, requests covering every input
dtype (UINT32 ids, FP32 settings, a UINT64 seed, a BOOL flag): greedy with log probs, sampling,
beam search. Run it once per environment, each with its checkout first on PYTHONPATH::

    PYTHONPATH=CHECKOUT JAX_PLATFORMS=cpu PYTHON bench/triton_outputs.py OUT.npz
    python bench/triton_outputs.py --compare OLD.npz NEW.npz    # exits 1 if they differ
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

# name -> FT contract inputs (besides input_ids / sequence_length / max_output_len)
CASES: dict[str, dict[str, tuple[type, object]]] = {
    "greedy": {"runtime_top_k": (np.uint32, 1), "is_return_log_probs": (np.bool_, True)},
    "sampled": {"runtime_top_k": (np.uint32, 5), "temperature": (np.float32, 0.8),
                "random_seed": (np.uint64, 2**40 + 7), "is_return_log_probs": (np.bool_, True)},
    "beam": {"beam_width": (np.uint32, 2), "len_penalty": (np.float32, 0.6)},
}


def _server(repo: Path):
    try:
        from serving.tritonserver import TritonServer
    except ImportError:  # a checkout from before serving.tritonserver existed
        from serving.local import TritonServer
    server = TritonServer(str(repo), "t5")
    server.start()
    server.wait_ready(300)
    return server


def _inputs(case: dict, batch: int, vocab: int):

    ids = np.random.default_rng(3).integers(2, vocab, size=(batch, 7)).astype(np.uint32)
    ids[:, -1] = 1
    lens = np.array([[7 - (r % 3)] for r in range(batch)], np.uint32)
    arrays = {"input_ids": ids, "sequence_length": lens,
              "max_output_len": np.full((batch, 1), 8, np.uint32)}
    arrays.update({n: np.full((batch, 1), v, t) for n, (t, v) in case.items()})
    from evaluation.client import to_infer_inputs

    return to_infer_inputs(arrays)


def collect(path: Path) -> None:
    """Serve the tiny model and save every case's outputs to ``path``."""
    import tritonclient.grpc as grpcclient

    from core import repository
    from testing.ft_writer import UL2_TINY, random_ft_weights, write_ft_folder

    with tempfile.TemporaryDirectory(prefix="triton-outputs-") as tmp:
        repo = Path(tmp) / "repo"
        version = repo / "t5" / "1"
        write_ft_folder(version, UL2_TINY, 1, random_ft_weights(UL2_TINY, seed=0))
        (version / "model.py").write_text(repository.JAX_MODEL_PY)
        (repo / "t5" / "config.pbtxt").write_text(repository.to_pbtxt(
            repository.model_config("t5", "jax", 1, data_type="fp32")))
        server = _server(repo)
        try:
            client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
            saved = {}
            for name, case in CASES.items():
                res = client.infer("t5", _inputs(case, 4, UL2_TINY.vocab_size))
                for out in res.get_response().outputs:
                    saved[f"{name}/{out.name}"] = res.as_numpy(out.name)
            client.close()
        finally:
            server.stop()
    np.savez(path, numpy=np.array(np.__version__), **saved)
    print(f"{path}: {len(saved)} outputs, numpy {np.__version__}")


def compare(a: Path, b: Path) -> int:
    """0 when both files hold the same outputs (ids exact, log probs within 1e-5)."""
    x, y = np.load(a), np.load(b)
    keys = sorted(k for k in x.files if k != "numpy")
    bad = sorted(set(keys) ^ {k for k in y.files if k != "numpy"})
    for k in keys:
        if k in y.files and x[k].dtype.kind == "f":
            same = np.allclose(x[k], y[k], atol=1e-5, rtol=0)
            print(f"{k}: {x[k].shape} max |diff| {np.abs(x[k] - y[k]).max():.2e}")
        elif k in y.files:
            same = np.array_equal(x[k], y[k])
            print(f"{k}: {x[k].shape} {'identical' if same else 'DIFFERENT'}")
        else:
            continue
        if not same:
            bad.append(k)
    print(f"numpy {x['numpy']} vs {y['numpy']}: "
          f"{'same outputs' if not bad else 'differ: ' + ', '.join(bad)}")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="write the outputs here (.npz)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files")
    args = p.parse_args()
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    if not args.out:
        p.error("give OUT.npz or --compare A B")
    collect(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
