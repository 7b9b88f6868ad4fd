"""What every entry point does the same way (interfaces.md).

- exit 0 on success; non-zero with a one-line reason on stderr otherwise;
- with --json, the last stdout line is one JSON object summarising the run;
- without --address and RAY_ADDRESS, a local Ray is started; with one, Ray's auth token is sent
  when this machine has one (Ray 2.60 heads require it), and a refusal is one line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from core import reach
from core.cli import emit_summary, run_main  # noqa: F401 - the entry points' names
from core.errors import UserError
from core.options import StageOptions, flag_specs

T = TypeVar("T", bound=StageOptions)

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: HOST:6379 (the head's GCS), ray://HOST:10001 (Ray "
        "Client) or 'auto' (the cluster `ray start` runs on this machine); default: "
        "RAY_ADDRESS, else a new local Ray",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON summary as the last stdout line"
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), as every other refusal is:
    the usage block it would print first is what --help is for."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def stage_parser(name: str, description: str, model: type[StageOptions] | None = None,
                 add_own: Callable[[argparse.ArgumentParser], None] | None = None,
                 ) -> argparse.ArgumentParser:
    """``python -m ray_jobs.NAME``'s parser: MODEL's flags, ADD_OWN's, then --address/--json."""
    p = OneLineParser(prog=f"python -m ray_jobs.{name}", description=description)
    if model is not None:
        add_options(p, model)
    if add_own is not None:
        add_own(p)
    add_common_arguments(p)
    return p


def add_options(parser: argparse.ArgumentParser, model: type[StageOptions],
                exclude: Iterable[str] = ()) -> None:
    """Add one flag per field of MODEL (but EXCLUDE): its help, default, choices and metavar.

    A bool is a store_true flag, or store_false when negated (``--no-progress`` sets
    ``progress``); a field without a default is a required flag; a field's ``group`` puts it in
    an argument group of that title. The dest is always the field name.
    """
    groups: dict[str, argparse._ActionsContainer] = {}
    for spec in flag_specs(model).values():
        if spec.name in exclude:
            continue
        where = parser
        if spec.group:
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            where = groups[spec.group]
        kwargs: dict = {"dest": spec.name, "help": spec.help}
        if spec.type is bool:
            kwargs["action"] = "store_false" if spec.negated else "store_true"
        else:
            kwargs.update(type=spec.type, default=spec.default)
            if spec.required:
                kwargs["required"] = True
            if spec.choices is not None:
                kwargs["choices"] = list(spec.choices)
            if spec.metavar or spec.key != spec.name:  # --retry-timeout, not RETRY_TIMEOUT_S
                kwargs["metavar"] = spec.metavar or spec.key.upper()
        where.add_argument(spec.flag, **kwargs)


def options_from_args(model: type[T], ns: argparse.Namespace, **extra) -> T:
    """MODEL built from the parsed flags (its fields present in NS), plus EXTRA fields."""
    fields = {name: getattr(ns, name) for name in model.flag_fields() if hasattr(ns, name)}
    return model(**fields, **extra)


def init_ray(address: str | None, **kwargs) -> None:
    """Connect to ADDRESS / RAY_ADDRESS (sending Ray's auth token if found), or start a local Ray.

    Workers get the repository on PYTHONPATH so the packages import the same way under
    `python -m` and under `ray job submit --working-dir .`.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = kwargs.pop("runtime_env", None) or {}
    if address is None:
        env_vars = dict(runtime_env.get("env_vars", {}))
        env_vars.setdefault("PYTHONPATH", _pythonpath())
        runtime_env = {**runtime_env, "env_vars": env_vars}
    kwargs = {"runtime_env": runtime_env or None,
              "log_to_driver": kwargs.pop("log_to_driver", True), **kwargs}
    if address is None:
        # "local", not None: ray.init(None) would join any cluster `ray start` left here.
        ray.init(address="local", **kwargs)
    else:
        _join(address, **kwargs)


# What a user joining a token-protected head needs to know, in one line.
_TOKEN_HELP = ("set RAY_AUTH_TOKEN to the head's token (`ray get-auth-token` on the head) or "
               "RAY_AUTH_TOKEN_PATH to a file holding it, and RAY_AUTH_MODE=token")


def _send_token_if_found() -> bool:
    """Before joining a head: send Ray's auth token when this machine has one.

    Ray 2.60's `ray start --head` requires a token whenever one exists on its machine (its
    default file ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), but ray.init with an
    address sends it only under RAY_AUTH_MODE=token. Ray's own loader looks for it in the same
    places; an explicit RAY_AUTH_MODE is left as the user set it. True when a token will be sent.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return False
    _enable_token_auth()  # RAY_AUTH_MODE=token here and in child jobs (the pipeline's stages)
    return True


@contextlib.contextmanager
def _stderr_to(file) -> Iterator[None]:
    """Point file descriptor 2 at FILE (Ray's C++ client logs there, below sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _check_address(address: str) -> None:
    """Refuse, in one line and within seconds, an address no Ray head can be joined at
    (ray.init retries an unreachable GCS for minutes without a word)."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise UserError(f"--address {address} is a URL (the dashboard's, for `ray job submit`);"
                        " join the head's GCS, HOST:6379, or ray://HOST:10001")
    client = address.startswith("ray://")
    try:
        host, port = reach.host_port(address, 10001 if client else 6379)
    except ValueError as exc:
        raise UserError(f"--address: {exc}") from None
    reach.require("the Ray head at", address, host, port,
                  "is the cluster up, and is this its GCS (HOST:6379) or ray://HOST:10001?")


def _join(address: str, **kwargs) -> None:
    """ray.init(address=ADDRESS); a head that refuses us for want of a token is one line.

    Ray's client retries a refused connection for several seconds, logging each refusal to
    stderr; that log is held back and, unless the cause was the token, passed on as it was.
    """
    import ray
    from ray.exceptions import AuthenticationError

    _check_address(address)
    sending = _send_token_if_found()
    with tempfile.TemporaryFile() as log:
        try:
            with _stderr_to(log):
                ray.init(address=address, **kwargs)
        except AuthenticationError as exc:  # RAY_AUTH_MODE=token, yet no token anywhere
            raise UserError(f"RAY_AUTH_MODE=token but no Ray auth token was found: "
                            f"{_TOKEN_HELP}") from exc
        except ConnectionError as exc:
            held = _read(log)
            if "InvalidAuthToken" not in held and "Unauthenticated" not in held:
                sys.stderr.write(held)
                raise
            found = ("refused the auth token found here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                     "or ~/.ray/auth_token)" if sending else
                     "requires token authentication and no auth token was found here")
            raise UserError(f"the Ray head at {address} {found}: {_TOKEN_HELP}") from exc
        sys.stderr.write(_read(log))


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def _pythonpath() -> str:
    parts = [str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)
