"""Gin configuration at the boundary: parse files and bindings, check value types and ranges, hash and export.

Every user mistake here becomes a one-line :class:`ConfigError` naming the file or binding.
Gin keeps no type information, so :func:`check_binding_types` compares each bound value with the
annotation of the parameter it binds (``n_iters: int`` rejects ``'abc'``) before anything runs; a
``%MACRO`` is resolved (through other macros and inside dicts, lists and tuples) and checked against
every parameter it reaches. Range checks declared with :func:`constrain` (``total_loss.lam >= 0``)
run on the same resolved values. Renamed bindings (:data:`RENAMED_BINDINGS`) are read under their new names.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import io
import logging
import math
import re
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import gin

from dlsm.errors import ConfigError

__all__ = [
    "GIN_DIR", "RENAMED_BINDINGS", "bindings_as_params", "call_configurable", "check_binding_types", "config_hash",
    "constrain", "finite_nonnegative", "finite_positive", "parse_config", "positive_int",
]

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")  # 'LAM = 0.5' (a macro has no '.')
T = TypeVar("T")

# Bindings renamed since configs were saved, old -> new (a scope in front is kept): parse_config reads them under the
# new name in gin files and --gin_param bindings, so a saved config (a run's operative_config.gin) means the same
# thing; not in files pulled in by 'include' nor inside a 'selector:' block (gin's error there names the new one).
RENAMED_BINDINGS: dict[str, str] = {
    "evaluator_network.seed": "EvaluatorSettings.seed", "evaluator_network.n_iters": "EvaluatorSettings.n_iters",
    "evaluator_network.batch_size": "EvaluatorSettings.batch_size", "evaluator_network.lr": "EvaluatorSettings.lr",
    "evaluator_network.augment": "EvaluatorSettings.augment", "evaluator_network.width": "EvaluatorSettings.width",
    "evaluator_network.depth": "EvaluatorSettings.depth",
    "image_metrics.cas_n_iters": "cas/EvaluatorSettings.n_iters",
    "image_metrics.cas_augment": "cas/EvaluatorSettings.augment",
}


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    loc = re.search(r'In file "([^"]+)", line (\d+)', text)
    return f"{loc.group(1)}:{loc.group(2)}: {first}" if loc else first


def _renamed(text: str) -> str:
    """``text`` with each binding key named in :data:`RENAMED_BINDINGS` replaced by its new one, in place (line
    numbers stay). gin's own parser finds the statements, so comments, strings and multi-line values are never
    touched; a text it cannot parse is returned as it is, for gin to report with its file and line."""
    try:
        bindings = [st for st in gin.config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True))
                    if isinstance(st, gin.config_parser.BindingStatement)]  # not an import, include or block
    except (ValueError, SyntaxError, TypeError, tokenize.TokenError):
        return text
    lines = text.splitlines(keepends=True)
    for st in bindings:
        new = RENAMED_BINDINGS.get(f"{st.selector.rsplit('.', 1)[-1]}.{st.arg_name}")
        old, i = f"{st.scope}/{st.selector}.{st.arg_name}".lstrip("/"), st.location.line_num - 1
        if new and st.location.char_num is None and lines[i].startswith(old):  # char_num is set only in a block
            lines[i] = (f"{st.scope}/{new}" if st.scope else new) + lines[i][len(old):]
    return "".join(lines)


def _renamed_hint(msg: str) -> str:
    m = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", msg)  # a renamed binding?
    new = RENAMED_BINDINGS.get(f"{m.group(1)}.{m.group(2)}") if m else None
    return f"{msg} (renamed: bind {new})" if new else msg


def _check_gin_file(f: str) -> None:
    path = Path(f)
    if path.is_dir():
        gins = sorted(path.glob("*.gin"))
        example = next((g for g in gins if g.name == "moons.gin"), gins[0] if gins else None)  # the default first
        hint = f", e.g. {example}" if example else ""
        raise ConfigError(f"--gin {f} is a folder; give a .gin file{hint}")
    if not path.is_file():
        raise ConfigError(f"gin file {f} not found; check the path given to --gin")


def parse_config(
    files: Sequence[str], bindings: Sequence[str], *, labels: Sequence[str] | None = None, check: bool = True
) -> None:
    """Parse gin ``files`` in order, then each ``--gin_param`` binding; raise ConfigError on any mistake. Renamed
    bindings (:data:`RENAMED_BINDINGS`) in both are read under their new names.

    ``labels`` names where each binding came from in messages (default ``--gin_param '<binding>'``);
    ``check = False`` skips the type, range and macro checks (syntax and names are still checked)."""
    labels = list(labels) if labels is not None else [f"--gin_param {b!r}" for b in bindings]
    if len(labels) != len(bindings):
        raise ValueError("parse_config: one label per binding")
    gin.clear_config()
    for d in {str(Path(f).resolve().parent) for f in files} | {str(GIN_DIR)}:
        gin.add_config_file_search_path(d)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs 'Path not found' itself; we report it once, below
    try:
        for f in files:
            _check_gin_file(f)
            try:
                text = io.StringIO(_renamed(Path(f).read_text(encoding="utf-8")))
                text.name = f  # gin's messages name the file and line, as when it opens the file itself
                gin.parse_config(text)
            except UnicodeDecodeError as err:
                raise ConfigError(f"{f}: not a text gin file ({err.reason} at byte {err.start})") from None
            except (ValueError, OSError, SyntaxError, TypeError, tokenize.TokenError) as err:
                msg = _renamed_hint(_one_line(err))
                if not msg.startswith(f) and f not in msg:
                    kind = "gin syntax error: " if isinstance(err, (SyntaxError, tokenize.TokenError)) else ""
                    msg = f"{f}: {kind}{msg}"
                raise ConfigError(msg) from None
        for b, label in zip(bindings, labels, strict=True):
            try:
                gin.parse_config(_renamed(b))
            except (ValueError, SyntaxError, TypeError, tokenize.TokenError) as err:
                raise ConfigError(f"{label}: {_renamed_hint(_one_line(err))}") from None
        if check:
            check_binding_types()
            _check_macros_used(bindings, labels)
    finally:
        root.setLevel(level)


def call_configurable(fn: Callable[[], T]) -> T:
    """Call a gin configurable with its bindings (``experiment()``); a missing ``gin.REQUIRED``
    binding becomes a one-line ConfigError."""
    try:
        return fn()
    except RuntimeError as err:
        text = str(err).strip()
        if not text.startswith("Required bindings"):
            raise
        raise ConfigError(f"{text.splitlines()[0]}; bind them in the gin file or with --gin_param") from None


# -- macros ------------------------------------------------------------------------------------
def _is_macro(value: object) -> bool:
    return (isinstance(value, gin.config.ConfigurableReference) and value.evaluate
            and value.configurable.wrapped is gin.config.macro)


def _macro_name(ref: gin.config.ConfigurableReference) -> str:
    return "/".join(ref.scopes)


def _macros() -> dict[str, object]:
    """Every defined macro: name -> its bound value (possibly another macro reference)."""
    return {scope: params["value"] for (scope, selector), params in gin.config._CONFIG.items()
            if selector == "gin.macro" and "value" in params}


def _macro_value(name: str, used_by: str) -> object:
    macros = _macros()
    if name not in macros:
        close = difflib.get_close_matches(name, list(macros), n=1)
        hint = f"did you mean %{close[0]}? " if close else ""
        raise ConfigError(f"%{name} is not defined (used by {used_by}); {hint}define it, e.g. "
                          f"--gin_param '{name} = ...'")
    return macros[name]


def _resolve(value: object, used_by: str, seen: tuple[str, ...] = ()) -> object:
    """``value`` with every macro reference replaced by its value, recursively."""
    if _is_macro(value):
        name = _macro_name(value)
        if name in seen:
            raise ConfigError(f"macros refer to each other in a cycle: {' -> '.join('%' + m for m in (*seen, name))}")
        return _resolve(_macro_value(name, used_by), used_by, (*seen, name))
    if isinstance(value, dict):
        return {k: _resolve(v, used_by, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, used_by, seen) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_resolve(v, used_by, seen) for v in value)
    return value


def _macro_refs(value: object) -> list[str]:
    """Names of the macros ``value`` refers to directly (not through other macros), in order."""
    if _is_macro(value):
        return [_macro_name(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _macro_refs(v)]
    return []


def _check_macros_used(bindings: Sequence[str], labels: Sequence[str]) -> None:
    """A macro set on the command line that no binding uses is a typo (``LAMM = 0.5``)."""
    macros = _macros()
    used: set[str] = set()
    for params in gin.config._CONFIG.values():
        for value in params.values():
            used.update(_macro_refs(value))
    for b, label in zip(bindings, labels, strict=True):
        m = _MACRO_BINDING.match(b)
        if m and m.group(1) in macros and m.group(1) not in used:
            name = m.group(1)
            close = difflib.get_close_matches(name, sorted(used), n=1)
            hint = f"did you mean {close[0]}?" if close else f"macros in use: {', '.join(sorted(used)) or 'none'}"
            raise ConfigError(f"{label}: no binding uses %{name}; {hint}")


# -- types ---------------------------------------------------------------------------------------
def _matches(value: object, hint: object) -> bool:
    if isinstance(value, gin.config.ConfigurableReference):
        return True  # @configurable or @configurable(): its type is not known before it is called
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
        return not args or len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict) and (len(args) != 2 or all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if origin in (list, set):
        return isinstance(value, origin) and (len(args) != 1 or all(_matches(v, args[0]) for v in value))
    if origin is not None or not isinstance(hint, type):
        return True  # Callable[...] and other forms: not checkable from a literal
    return isinstance(value, hint)


def _parts(value: object, hint: object) -> list[tuple[str, object, object]] | None:
    """The (index, item, item hint) of a container ``value`` checked against a container ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and isinstance(value, (tuple, list)) and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return [(f"[{i}]", v, args[0]) for i, v in enumerate(value)]
        if len(args) == len(value):
            return [(f"[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))]
    if origin in (list, set) and isinstance(value, origin) and len(args) == 1:
        return [(f"[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [(f"[{k!r}]", v, args[1]) for k, v in value.items()]
    return None


def _blame(value: object, hint: object, used_by: str, path: str = "") -> tuple[str, object, str, object] | None:
    """Which macro makes ``value`` mismatch ``hint``: (macro, its resolved value, path inside the
    parameter, the hint there), or None when the literal itself is wrong."""
    if _is_macro(value):
        name = _macro_name(value)
        inner = _macro_value(name, used_by)
        return _blame(inner, hint, used_by, path) or (name, _resolve(inner, used_by), path, hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        same_kind = [a for a in typing.get_args(hint) if isinstance(typing.get_origin(a) or a, type)
                     and isinstance(value, typing.get_origin(a) or a)]
        return _blame(value, same_kind[0], used_by, path) if len(same_kind) == 1 else None
    for index, item, item_hint in _parts(value, hint) or []:
        if not _matches(_resolve(item, used_by), item_hint):
            return _blame(item, item_hint, used_by, path + index)
    return None


def _hint_str(hint: object) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _hints(fn_or_cls: object) -> dict[str, object]:
    target = fn_or_cls.__init__ if inspect.isclass(fn_or_cls) else fn_or_cls
    target = inspect.unwrap(target)
    try:
        return typing.get_type_hints(target)
    except Exception:
        return {}


# -- ranges --------------------------------------------------------------------------------------
_CONSTRAINTS: dict[object, dict[str, Callable[[Any], str | None]]] = {}


def constrain(fn: Callable | str, param: str, check: Callable[[Any], str | None]) -> None:
    """Declare a range check for gin bindings of ``fn``'s ``param`` (``fn`` may also be a gin selector
    such as ``'torch.optim.Adam'``): ``check(value)`` returns what is wrong (``'must be >= 0'``) or
    None. It runs in :func:`check_binding_types`, before anything trains."""
    _CONSTRAINTS.setdefault(fn if isinstance(fn, str) else inspect.unwrap(fn), {})[param] = check


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_nonnegative(value: Any) -> str | None:
    """A range check for :func:`constrain`: a finite number >= 0 (other types are left to the type check)."""
    return "must be a finite number >= 0" if _number(value) and not (math.isfinite(value) and value >= 0) else None


def finite_positive(value: Any) -> str | None:
    """A range check for :func:`constrain`: a finite number > 0."""
    return "must be a finite number > 0" if _number(value) and not (math.isfinite(value) and value > 0) else None


def positive_int(value: Any) -> str | None:
    """A range check for :func:`constrain`: an integer >= 1."""
    return "must be >= 1" if _number(value) and value < 1 else None


# configurables whose own code does not check these (third-party classes) or checks them only late
for _optimizer in ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"):
    constrain(_optimizer, "lr", finite_nonnegative)
constrain("dlsm.data.points.two_moons", "n", positive_int)
constrain("dlsm.math.schedules.noise_schedule", "eps", finite_positive)


def check_binding_types() -> None:
    """Compare each bound value (macros resolved) with its parameter's annotation and declared range;
    raise ConfigError on the first mismatch, naming the macro that carries the wrong value."""
    for (scope, selector), params in list(gin.config._CONFIG.items()):  # gin exposes no public iterator
        if selector == "gin.macro":
            continue
        where = f"{scope}/" if scope else ""
        short = selector.rsplit(".", 1)[-1] if selector.startswith("dlsm.") else selector  # as the user wrote it
        configurable = gin.config._REGISTRY.get_match(selector)
        hints = _hints(configurable.wrapped) if configurable is not None else {}
        checks = {} if configurable is None else {
            **_CONSTRAINTS.get(configurable.selector, {}), **_CONSTRAINTS.get(inspect.unwrap(configurable.wrapped), {})}
        for name, value in params.items():
            binding = f"{where}{short}.{name}"
            resolved = _resolve(value, binding)  # also: every macro it uses is defined
            if name in hints and not _matches(resolved, hints[name]):
                blamed = _blame(value, hints[name], binding)
                if blamed is not None:
                    macro, macro_value, path, hint = blamed
                    raise ConfigError(f"{macro} = {macro_value!r}: {binding}{path} expects {_hint_str(hint)}")
                raise ConfigError(f"{binding} = {_with_macros(value, binding)}: expected {_hint_str(hints[name])}")
            problem = checks[name](resolved) if name in checks else None
            if problem:
                if _is_macro(value):
                    macro = _macro_refs(value)[0]
                    inner = _macro_value(macro, binding)
                    while _is_macro(inner):  # the macro that holds the literal
                        macro = _macro_name(inner)
                        inner = _macro_value(macro, binding)
                    raise ConfigError(f"{macro} = {resolved!r}: {binding} {problem}")
                raise ConfigError(f"{binding} = {_with_macros(value, binding)}: {problem}")


def _with_macros(value: object, used_by: str) -> str:
    """``repr(value)``, followed by the values of the macros it uses (``('total', %ALPHA) with ALPHA = -1``)."""
    refs = list(dict.fromkeys(_macro_refs(value)))
    if not refs:
        return repr(value)
    values = ", ".join(f"{m} = {_resolve(_macro_value(m, used_by), used_by)!r}" for m in refs)
    return f"{value!r} with {values}"


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


def _is_reference(value: object) -> bool:
    return isinstance(value, gin.config.ConfigurableReference)
