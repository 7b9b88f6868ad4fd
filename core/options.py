"""One options model per stage: the CLI flags, the pipeline's YAML keys and the library call.

A stage's options are a pydantic model whose fields carry everything its command line needs:
``description`` is the ``--help`` text, ``Literal[...]`` gives the choices, and
``json_schema_extra`` may add ``metavar``, ``flag`` (when the flag is not ``--`` + the field name
with dashes), ``group`` (an argparse argument group) and ``cli: False`` (a library-only knob).
A ``bool`` field defaulting to True whose flag starts with ``--no-`` is a negated flag
(``progress: bool = True`` <-> ``--no-progress``).

ray_jobs/_cli.py builds argparse parsers from :func:`flag_specs`; pipeline/config.py checks YAML
sections against the same specs; so flags, keys and fields cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import pydantic
from pydantic.fields import FieldInfo

from core.errors import UserError


class OptionsError(UserError, ValueError):
    """Options no run could accept (a wrong type, a value out of range); names the flag."""


def _refusal(exc: pydantic.ValidationError) -> UserError:
    """The first problem pydantic found, as the UserError a validator raised or one line."""
    error = exc.errors()[0]
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, UserError):
        return raised
    if isinstance(raised, ValueError):  # a validator's own message names the flag
        return OptionsError(str(raised))
    where = ".".join(str(p) for p in error.get("loc", ()))
    flag = f"--{where.replace('_', '-')}: " if where else ""
    return OptionsError(f"{flag}{error.get('msg')} (got {error.get('input')!r})")


class StageOptions(pydantic.BaseModel):
    """Base of every stage's options: attribute access, keyword construction, no extra keys.

    ``opts.__dict__`` holds exactly the fields, so ``Model(**{**opts.__dict__, "x": 1})`` copies
    with a change (as ``dataclasses.replace`` did for the dataclasses these replace). Checks
    live here, as field constraints and model validators, so every entry point (the command
    lines, the pipeline, a library call) gets the same ones; a failed check is a UserError.
    """

    # model_name / model_repository are real option names, not pydantic's namespace.
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise _refusal(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):  # type: ignore[override]
        """pydantic's, with a failed check as a UserError (see :class:`StageOptions`)."""
        try:
            return super().model_validate(obj, **kwargs)
        except pydantic.ValidationError as exc:
            raise _refusal(exc) from None

    def replace(self, **changes: Any):
        """A checked copy with ``changes`` (the pipeline's per-run overrides)."""
        return type(self)(**{**self.__dict__, **changes})

    @classmethod
    def flag_fields(cls) -> dict[str, FieldInfo]:
        """The fields that are command-line flags (all but those marked ``cli: False``)."""
        return {name: f for name, f in cls.model_fields.items() if _extra(f).get("cli", True)}


def option(default: Any = ..., *, help: str, metavar: str | None = None,  # noqa: A002
           flag: str | None = None, group: str | None = None, cli: bool = True) -> Any:
    """A field of an options model with its command-line metadata (no default: required).

    Args:
      default: the default value; ``...`` (the default) makes the field required.
      help: the --help text (the field's description).
      metavar: argparse's metavar.
      flag: the long option when it is not ``--`` + the name with dashes (``--no-progress``).
      group: the title of the argparse argument group the flag is listed under.
      cli: False for a library-only knob: neither a flag nor a pipeline key.
    """
    extra = {k: v for k, v in (("metavar", metavar), ("flag", flag), ("group", group))
             if v is not None}
    if not cli:
        extra["cli"] = False
    return pydantic.Field(default, description=help, json_schema_extra=extra or None)


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One option field as a command-line flag (and a YAML key of the pipeline).

    Attributes:
      name: the field name (argparse's dest).
      flag: the long option, e.g. ``--max-input-len`` or ``--no-progress``.
      key: the YAML key: the flag without ``--``, dashes as underscores (``no_progress``).
      type: int, float, str or bool (the field's annotation without None).
      choices: the Literal's values, or None.
      negated: a True-by-default bool whose flag turns it off.
      required: the field has no default.
      default: the field's default (None when required).
      help: the --help text.
      metavar: argparse's metavar, or None.
      group: the argparse argument group's title, or None.
    """

    name: str
    flag: str
    key: str
    type: type
    choices: tuple[Any, ...] | None
    negated: bool
    required: bool
    default: Any
    help: str | None
    metavar: str | None
    group: str | None


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _base_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None]:
    """(scalar type, Literal choices or None) of an annotation; ``X | None`` counts as X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]  # `str | Sequence[str]` (evaluate's url): the CLI gives a str
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return (annotation if annotation in (int, float, str, bool) else str), None


def flag_specs(model: type[StageOptions]) -> dict[str, FlagSpec]:
    """The model's flags by field name, in field order."""
    out = {}
    for name, field in model.flag_fields().items():
        extra = _extra(field)
        typ, choices = _base_type(field.annotation)
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        required = field.is_required()
        out[name] = FlagSpec(
            name=name, flag=flag, key=flag[2:].replace("-", "_"), type=typ, choices=choices,
            negated=typ is bool and flag.startswith("--no-"), required=required,
            default=None if required else field.default, help=field.description,
            metavar=extra.get("metavar"), group=extra.get("group"))
    return out


def specs_to_argv(specs: dict[str, FlagSpec], settings: dict[str, Any]) -> list[str]:
    """Settings keyed by YAML key (``no_progress``, ``max_input_len``) as a command line.

    A bool key is given as the flag alone when True and left out when False; None is left out.
    """
    by_key = {s.key: s for s in specs.values()}
    argv: list[str] = []
    for key, value in settings.items():
        if value is None:
            continue
        spec = by_key[key]
        if spec.type is bool:
            if value:
                argv.append(spec.flag)
            continue
        if isinstance(value, (list, tuple)):  # evaluate's url: several endpoints
            value = ",".join(map(str, value))
        argv += [spec.flag, str(value)]
    return argv


def from_keys(model: type[StageOptions], settings: dict[str, Any]) -> dict[str, Any]:
    """YAML-keyed settings as field values (``no_progress: true`` -> ``progress=False``).

    Field names that are not also keys (``progress``) are accepted as they are.
    """
    by_key = {s.key: s for s in flag_specs(model).values()}
    out: dict[str, Any] = {}
    for key, value in settings.items():
        spec = by_key.get(key)
        if spec is None:
            out[key] = value
        elif spec.negated:
            out[spec.name] = not value
        else:
            out[spec.name] = value
    return out
