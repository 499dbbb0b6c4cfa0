"""Gin configuration at the boundary: parse files and bindings, check value types, hash and export.

Every user mistake here becomes a one-line :class:`ConfigError` naming the file or binding.
Gin keeps no type information, so :func:`check_binding_types` compares each bound literal with
the annotation of the parameter it binds (``n_iters: int`` rejects ``'abc'``) before anything runs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import tokenize
import types
import typing
from pathlib import Path

import gin

from dlsm.errors import ConfigError

__all__ = ["bindings_as_params", "check_binding_types", "config_hash", "parse_config"]

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    loc = re.search(r'In file "([^"]+)", line (\d+)', text)
    return f"{loc.group(1)}:{loc.group(2)}: {first}" if loc else first


def parse_config(files: list[str], bindings: list[str]) -> None:
    """Parse gin ``files`` in order, then each ``--gin_param`` binding; raise ConfigError on any mistake."""
    gin.clear_config()
    for d in {str(Path(f).resolve().parent) for f in files} | {str(GIN_DIR)}:
        gin.add_config_file_search_path(d)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs 'Path not found' itself; we report it once, below
    try:
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"gin file {f} not found; check the path given to --gin")
            try:
                gin.parse_config_file(f)
            except (ValueError, OSError, SyntaxError, TypeError, tokenize.TokenError) as err:
                msg = _one_line(err)
                if isinstance(err, (SyntaxError, tokenize.TokenError)) and not msg.startswith(f):
                    msg = f"{f}: gin syntax error: {msg}"
                raise ConfigError(msg) from None
        for b in bindings:
            try:
                gin.parse_config(b)
            except (ValueError, SyntaxError, TypeError, tokenize.TokenError) as err:
                raise ConfigError(f"--gin_param {b!r}: {_one_line(err)}") from None
        check_binding_types()
    finally:
        root.setLevel(level)


def _is_reference(value: object) -> bool:
    return isinstance(value, gin.config.ConfigurableReference) or type(value).__name__ == "MacroReference"


def _matches(value: object, hint: object) -> bool:
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin in (list, dict, set):
        return isinstance(value, origin)
    if origin is not None or not isinstance(hint, type):
        return True  # Callable[...] and other forms: not checkable from a literal
    return isinstance(value, hint)


def _hints(fn_or_cls: object) -> dict[str, object]:
    target = fn_or_cls.__init__ if inspect.isclass(fn_or_cls) else fn_or_cls
    target = inspect.unwrap(target)
    try:
        return typing.get_type_hints(target)
    except Exception:
        return {}


def check_binding_types() -> None:
    """Compare each bound literal with its parameter's annotation; raise ConfigError on a mismatch."""
    for (scope, selector), params in gin.config._CONFIG.items():  # gin exposes no public iterator
        if selector == "gin.macro":
            continue
        configurable = gin.config._REGISTRY.get_match(selector)
        if configurable is None:
            continue
        hints = _hints(configurable.wrapped)
        for name, value in params.items():
            if _is_reference(value) or name not in hints:
                continue
            if not _matches(value, hints[name]):
                where = f"{scope}/" if scope else ""
                hint = getattr(hints[name], "__name__", None) or str(hints[name]).replace("typing.", "")
                raise ConfigError(
                    f"{where}{selector.rsplit('.', 1)[-1]}.{name} = {value!r}: expected {hint}"
                )


def config_hash() -> str:
    """A short hash of the full parsed configuration; a relaunch with the same config resumes."""
    return hashlib.sha256(gin.config_str().encode()).hexdigest()[:12]


def bindings_as_params() -> dict[str, str]:
    """Every binding as ``scope/name.param -> repr(value)``, for MLflow params."""
    out: dict[str, str] = {}
    for (scope, selector), params in gin.config._CONFIG.items():
        short = selector.rsplit(".", 1)[-1] if selector.startswith("dlsm.") else selector
        for name, value in params.items():
            if selector == "gin.macro":
                key = f"macro.{scope}"
            else:
                key = f"{scope + '/' if scope else ''}{short}.{name}"
            out[key] = repr(value) if not _is_reference(value) else str(value)
    return out
