"""Loading user code named by a hook flag, and checking it against the hook's contract before any compute.

Every hook flag (``--custom-rm-path``, ``--rollout-function-path``, ...; the table is in docs/customization.md)
names its function in one of three ways:

- ``pkg.mod.fn`` or ``pkg.mod:fn`` (``pkg.mod:Class.method`` reaches into a class), imported from ``sys.path``;
- ``path/to/file.py:fn``, imported from the file (its folder is not added to ``sys.path``).

``load_plugin`` imports the object and decides its call form from its positional parameters: sluice's typed
form (``Contract.ours``) or slime's form (``Contract.slime``), whose first argument is the run's flags as a
namespace (``slime_args``); where both forms take as many arguments, a first parameter named ``args`` means
slime's. Anything else is a ``PluginError`` that names the flag, the path and the expected
signature, raised at start-up, before any model is loaded.

A hook the run calls synchronously (a filter, an advantage function) that raises stops the run with a
``PluginCallError`` naming the flag and path, with the traceback from the user's frames on (``tracebacks.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError
from sluice.tracebacks import user_traceback

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
# Where sluice's and slime's forms take as many arguments, slime's is told by its first parameter's name.
SLIME_FIRST_PARAMETER = "args"


class PluginError(ConfigError):
    """A hook's plug-in cannot be used; the message names the flag, the path and what was expected."""


class PluginPathError(PluginError):
    """The path itself is malformed (no function named)."""


class PluginImportError(PluginError, ImportError):
    """The module or file does not import, or lacks the attribute."""


class PluginSignatureError(PluginError, TypeError):
    """The object is not callable in any form the hook accepts."""


class PluginCallError(RuntimeError):
    """A plug-in called synchronously raised; the message names the flag and path and shows the user's frames.
    The original error is the ``__cause__``."""


@dataclass(frozen=True)
class Contract:
    """The call forms one hook accepts, counted in positional arguments.

    ``ours`` and ``slime`` are the signatures as shown in errors and docs; ``num_args`` / ``slime_num_args``
    the number of positional arguments each form is called with (None: no slime form).
    """

    flag: str
    ours: str
    num_args: int
    slime: str | None = None
    slime_num_args: int | None = None
    sync_only: bool = False  # called inside a backward pass or a sync loop: a coroutine function is refused
    is_class: bool = False  # the path names a class (or factory) that is instantiated

    def expected(self) -> str:
        forms = f"sluice's {self.ours}"
        return forms + (f" or slime's {self.slime}" if self.slime else "")


@dataclass(frozen=True)
class Plugin:
    """A loaded, checked plug-in: call it with ``call_args(...)`` in the form it was written in."""

    fn: Callable[..., Any]
    path: str
    contract: Contract
    slime_form: bool  # True: call as fn(slime_args, ...)
    is_async: bool

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", self.path)

    def leading(self, slime_args: Any) -> tuple[Any, ...]:
        return (slime_args,) if self.slime_form else ()

    def call_sync(self, slime_args: Any, *args: Any) -> Any:
        """Call in this thread, in the plug-in's form (hooks with ``sync_only`` contracts); an error it raises
        becomes a PluginCallError naming the flag and path."""
        try:
            return self.fn(*self.leading(slime_args), *args)
        except Exception as error:
            raise PluginCallError(f"{self.contract.flag} {self.path} raised {type(error).__name__}: {error}\n"
                                  f"{user_traceback(error)}") from error

    async def call(self, slime_args: Any, *args: Any) -> Any:
        """Await the plug-in in its form: a coroutine function directly, a plain one in a daemon thread."""
        if self.is_async:
            return await self.fn(*self.leading(slime_args), *args)
        result = await call_in_thread(self.fn, *self.leading(slime_args), *args)
        if inspect.isawaitable(result):  # a sync wrapper that hands back a coroutine
            result = await result
        return result


def split_path(path: str, flag: str) -> tuple[str, str]:
    """``pkg.mod.fn`` / ``pkg.mod:fn`` / ``file.py:fn`` -> (module name or file path, attribute path)."""
    form = "'package.module.function', 'package.module:function' or 'path/to/file.py:function'"
    if path.endswith(".py"):
        raise PluginPathError(f"{flag} {path!r}: name the function too, as 'path/to/file.py:fn'")
    if ":" in path:
        module_part, _, attr = path.rpartition(":")
    else:
        module_part, _, attr = path.rpartition(".")
    if not module_part or not attr:
        raise PluginPathError(f"{flag} {path!r} must look like {form}")
    return module_part, attr


def _import_file(file: Path, flag: str, path: str):
    if not file.is_file():
        raise PluginImportError(f"{flag} {path!r}: no such file {file}")
    resolved = file.resolve()
    # One module per file, named after its resolved path: two hooks in one file share its module state.
    name = f"sluice_plugin_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginImportError(f"{flag} {path!r}: importing {file} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _not_on_path_hint(exc: Exception, module_part: str, attr: str) -> str:
    """How to reach a module that is not on the import path: by its file, or with its folder on PYTHONPATH.

    Only when the missing module is the plug-in's own (or a package above it); a missing dependency inside
    it is reported as it is."""
    parts = module_part.split(".")
    if not isinstance(exc, ModuleNotFoundError) or exc.name not in {".".join(parts[:i + 1]) for i in range(len(parts))}:
        return ""
    file = Path(*parts).with_suffix(".py")
    if file.is_file():
        return (f"; {file} is in {Path.cwd()} but not on Python's import path: name it as '{file}:{attr}', "
                "or run with PYTHONPATH=.")
    return f"; if it is a file, name it as 'path/to/file.py:{attr}', or add its folder to PYTHONPATH"


def resolve(path: str, flag: str) -> Any:
    """The object ``path`` names; errors name the flag, the path and the missing piece."""
    module_part, attr = split_path(path, flag)
    if module_part.endswith(".py") or "/" in module_part:
        module = _import_file(Path(module_part), flag, path)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:  # ImportError, or anything the module raises while importing
            raise PluginImportError(f"{flag} {path!r}: cannot import {module_part!r}: {type(exc).__name__}: {exc}"
                                    f"{_not_on_path_hint(exc, module_part, attr)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginImportError(f"{flag} {path!r}: module {module_part!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _positional_counts(fn: Callable[..., Any], flag: str, path: str) -> tuple[int, int, bool, list[str]]:
    """(required positionals, all positionals, has *args, required keyword-only names)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise PluginSignatureError(f"{flag} {path!r}: cannot read the signature: {exc}") from exc
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    keywords = [p.name for p in params
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    return len(required), len(positional), var_positional, keywords


def _accepts(counts: tuple[int, int, bool, list[str]], n: int) -> bool:
    required, total, var_positional, _ = counts
    return required <= n and (n <= total or var_positional)


def is_async_callable(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _signature_text(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


def _first_parameter(fn: Callable[..., Any]) -> str | None:
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind in _POSITIONAL]
    except (TypeError, ValueError):
        return None
    if params and params[0].name == "self":
        params = params[1:]
    return params[0].name if params else None


def check_form(fn: Any, contract: Contract, path: str) -> Plugin:
    """Decide the call form of ``fn`` under ``contract``; raises PluginSignatureError when none fits."""
    flag = contract.flag
    if not callable(fn):
        raise PluginSignatureError(f"{flag} {path!r}: it is a {type(fn).__name__}, not a function; "
                                   f"expected {contract.expected()}")
    target = fn.__init__ if contract.is_class and inspect.isclass(fn) else fn
    counts = _positional_counts(target, flag, path)
    if contract.is_class and inspect.isclass(fn):  # the constructor's `self` is not an argument
        counts = (max(counts[0] - 1, 0), max(counts[1] - 1, 0), counts[2], counts[3])
    shown = _signature_text(fn)
    if counts[3]:
        raise PluginSignatureError(f"{flag} {path!r}: {shown} has required keyword-only parameters "
                                   f"{counts[3]}; expected {contract.expected()}")
    slime_n = contract.slime_num_args
    if slime_n is not None and slime_n == contract.num_args and _accepts(counts, slime_n):
        slime_form = _first_parameter(target) == SLIME_FIRST_PARAMETER  # same arity: slime's first is `args`
    elif slime_n is not None and counts[0] == slime_n:
        slime_form = True  # exactly slime's required arguments: slime's form, even where ours would also fit
    elif _accepts(counts, contract.num_args):
        slime_form = False
    elif slime_n is not None and _accepts(counts, slime_n):
        slime_form = True
    else:
        raise PluginSignatureError(f"{flag} {path!r}: the function takes {shown}; expected {contract.expected()}")
    is_async = is_async_callable(fn)
    if contract.sync_only and is_async:
        raise PluginSignatureError(f"{flag} {path!r}: {shown} is async; this hook calls it synchronously, "
                                   f"expected a plain function {contract.ours}")
    return Plugin(fn, path, contract, slime_form, is_async)


def load_plugin(path: str, contract: Contract) -> Plugin:
    """Import ``path`` and check it against ``contract`` (see the module docstring)."""
    return check_form(resolve(path, contract.flag), contract, path)


# The attributes slime plug-ins commonly read that are not sluice flags, with the value that means
# "not used here". Everything else on the namespace is a sluice flag, named as slime names it.
_SLIME_EXTRAS: dict[str, Any] = {
    "partial_rollout": False,
    "rollout_global_dataset": True,
    "rollout_skip_special_tokens": True,
    "sglang_router_ip": None,
    "sglang_router_port": None,
    "tool_key": None,
    "eval_reward_key": None,
    "use_wandb": False,
}


def slime_args(flags: dict[str, Any], **overrides: Any) -> argparse.Namespace:
    """The namespace a slime-style ``(args, ...)`` plug-in gets: every flag by slime's attribute name.

    ``flags`` is ``config_to_dict(config)``; ``overrides`` set run-time values such as the gateway address.
    """
    return argparse.Namespace(**{**_SLIME_EXTRAS, **flags, **overrides})


async def call_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking plug-in call in a fresh daemon thread and await its result.

    Not the loop's default executor: a call that never returns (a hung scorer or tool) would make
    ``asyncio.run`` wait for it at exit, and a pool thread would hold up the interpreter's exit. Cancelling the
    await abandons the thread, which cannot be stopped from outside; it ends when the call does.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(outcome: Any, failed: bool) -> None:
        if future.done():  # cancelled meanwhile
            return
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        try:
            outcome, failed = fn(*args), False
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome, failed = error, True
        try:
            loop.call_soon_threadsafe(settle, outcome, failed)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=work, name=f"sluice-plugin-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future
