"""--verify and --resume on gs:// check objects by the crc32c GCS keeps in their metadata.

The output is written by a real conversion (local t5x checkpoint -> gs:// on the
fake-gcs-server emulator); the checks then run with the GCS client pointed at a real HTTP
proxy in front of the emulator (:class:`CountingProxy`), which forwards every request and
records it, so the test sees which objects' media the checks downloaded (``alt=media``): the
manifest and config.ini, and no weight file, whether they are intact or one was changed.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Iterator

import pytest

from conversion import run
from conversion.run import ConversionError, ConvertOptions, convert
from core import gcs_env, manifest, storage
from core.t5config import T5Config
from demo.t5x_writer import gin_config, random_t5x_params, write_t5x_checkpoint
from tests.gcs_emulator import patched_environ

CFG = T5Config(d_model=32, num_heads=2, d_kv=16, d_ff=64, vocab_size=128, num_encoder_layers=2,
               num_decoder_layers=2, feed_forward_proj="gated-gelu")


class CountingProxy:
    """An HTTP reverse proxy to the emulator that records (method, path?query) of each request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                proxy.requests.append((self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def media_gets(self) -> list[str]:
        """Requests that downloaded a weight file's bytes (the small manifest.json and
        config.ini are read whole, as they must be)."""
        return [p for m, p in self.requests
                if m == "GET" and ("alt=media" in p or p.startswith("/download/"))
                and ".bin" in urllib.parse.unquote(p)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(gcs) -> Iterator[CountingProxy]:
    """The GCS client of this process pointed at a CountingProxy in front of the emulator."""
    p = CountingProxy(gcs.url)
    try:
        with patched_environ({"STORAGE_EMULATOR_HOST": p.url}):
            yield p
    finally:
        p.close()


@pytest.fixture
def converted(gcs, gcs_prefix, ray_local, tmp_path) -> tuple[ConvertOptions, str]:
    """A conversion written to gs:// (with its own --verify run); (options, weights URL)."""
    src = write_t5x_checkpoint(tmp_path / "model", random_t5x_params(CFG), step=10,
                               gin=gin_config(CFG))
    opts = ConvertOptions(src=str(src), dst=f"gs://{gcs.bucket}/{gcs_prefix}", verify=True,
                          progress=False)
    summary = convert(opts)
    assert summary["verified"] is True
    return opts, summary["output"]


def _verify_all(opts: ConvertOptions, out: str) -> None:
    _, _, plan, _ = run.prepare(opts)
    _, entries = manifest.parse_manifest(storage.read_text(storage.join(out, "manifest.json")))
    for task in plan.tasks:
        run.verify_layer(task, out, entries)


def test_verify_reads_metadata_only_and_catches_a_changed_object(converted, proxy, gcs):
    opts, out = converted
    _, entries = manifest.parse_manifest(storage.read_text(storage.join(out, "manifest.json")))
    assert all(e.crc32c and e.sha256 is None for e in entries.values())
    proxy.requests.clear()
    _verify_all(opts, out)
    assert proxy.requests, "the checks did not go through the proxy"
    assert proxy.media_gets() == [], "verify downloaded weight files"
    assert manifest.verify_repository(opts.dst, opts.model_name) is None

    # Same size, one byte different, written straight to the emulator (not via the proxy).
    name = sorted(n for n in entries if n.endswith(".bin"))[0]
    bucket, obj = gcs_env.split_gs_url(storage.join(out, name))
    with patched_environ({"STORAGE_EMULATOR_HOST": gcs.env["STORAGE_EMULATOR_HOST"]}):
        data = bytearray(gcs_env.storage_client().bucket(bucket).blob(obj).download_as_bytes())
        data[0] ^= 0xFF
        gcs_env.storage_client().bucket(bucket).blob(obj).upload_from_string(bytes(data))
    proxy.requests.clear()
    with pytest.raises(ConversionError, match=f"{name} does not match its manifest crc32c"):
        _verify_all(opts, out)
    assert "crc32c differs" in manifest.verify_repository(opts.dst, opts.model_name)
    assert proxy.media_gets() == []
    entry = entries[name]
    assert manifest.file_mismatch(storage.join(out, name), entry) == ("crc32c", entry.bytes)
    assert proxy.media_gets() == []
    # --resume keeps every other object by its metadata and rewrites the changed one.
    proxy.requests.clear()
    resumed = convert(ConvertOptions(**{**opts.__dict__, "verify": False, "resume": True}))
    assert resumed["skipped_files"] == resumed["files"] - 1
    assert proxy.media_gets() == []
    assert manifest.verify_repository(opts.dst, opts.model_name) is None
