"""Where a key holder's Jinja2 template is compiled and rendered: a child process with a
time limit, a memory limit and an output limit.

Jinja2's sandbox keeps a template away from Python's internals, but not from the CPU or the
memory: `{{ 'x' * 10**9 }}` is folded while compiling, `{{ 9**(9**9) }}` runs for hours, two
nested `range(100000)` loops never end, and `~` or a filter such as `center` builds strings
of any size. Python cannot stop a thread, so a template runs in a process of its own that is
killed when its time is up (PROMPTQ_TEMPLATE_MAX_MS) and whose address space is capped;
the sandbox's intercepted operators (`*`, `**`, `%`, `+`) refuse the obvious bombs with a
clear message before they are computed, and keep the compiler from folding them.

The children fork from a `forkserver` process that has imported this module, not from the
API process itself: forking a process that runs threads (uvicorn's pool) can copy a lock
another thread held, and the fork server is single-threaded and small.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from promptq.errors import InvalidRequest

# Integers may grow to this many bits (about 20,000 decimal digits): far past any count a
# prompt needs, and cheap to multiply.
MAX_INT_BITS = 65_536
# Renders at once per API process: each is a process of its own, and deploy/'s pod has 512 MiB.
CONCURRENT_RENDERS = 4
# Memory a render may take beyond what its process holds when it starts, besides room for
# a few copies of the largest output it may make.
MEMORY_HEADROOM_BYTES = 64 * 1024 * 1024
# Starting a child is not the template's time; a fork server that does not answer in this
# long is broken, and the request fails with a message rather than hanging.
START_TIMEOUT_SECONDS = 30.0

_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateError(InvalidRequest, ValueError):
    """A template, or the payload given to it, that cannot make a prompt; the message says
    which limit or which error."""


@dataclass(frozen=True)
class Limits:
    max_ms: int
    max_bytes: int


class _Bounded(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators that can build huge values checked before they run.
    Intercepted operators are also never folded at compile time (Jinja's optimizer leaves
    them to `call_binop`), so compiling costs no more than parsing."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, max_bytes: int) -> None:
        # StrictUndefined makes a missing variable an error rather than an empty string.
        super().__init__(undefined=StrictUndefined, autoescape=False)
        self.max_bytes = max_bytes

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right, self.max_bytes)
        return super().call_binop(context, operator, left, right)


def _sized(value: Any) -> bool:
    return isinstance(value, str | bytes | list | tuple)


def _check_binop(operator: str, left: Any, right: Any, max_bytes: int) -> None:
    too_big = f"the limit is {max_bytes} (PROMPTQ_TEMPLATE_MAX_BYTES)"
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if _sized(seq) and isinstance(times, int) and len(seq) * max(times, 0) > max_bytes:
                raise TemplateError(
                    f"'*' would make a value of {len(seq) * times} items or characters; {too_big}"
                )
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"'*' would make an integer of more than {MAX_INT_BITS} bits")
    elif operator == "**":
        if ints and abs(left) > 1 and right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateError(f"'**' would make an integer of more than {MAX_INT_BITS} bits")
    elif operator == "+":
        if _sized(left) and _sized(right) and len(left) + len(right) > max_bytes:
            raise TemplateError(
                f"'+' would make a value of {len(left) + len(right)} characters; {too_big}"
            )
    elif operator == "%" and isinstance(left, str):
        widths = sum(
            int(number)
            for match in _FORMAT_SPEC.finditer(left)
            for number in match.groups()
            if number and number.isdigit()
        )
        if "*" in {g for match in _FORMAT_SPEC.finditer(left) for g in match.groups()}:
            raise TemplateError("'%' with a '*' width or precision is not allowed in templates")
        if len(left) + widths > max_bytes:
            raise TemplateError(f"'%' would make a string of {len(left) + widths}; {too_big}")


def _compile(source: str, max_bytes: int) -> Any:
    try:
        return _Bounded(max_bytes).from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"line {exc.lineno}: {exc.message}") from None


def _check(sources: dict[str, str], limits: Limits) -> dict[str, str]:
    for field, source in sources.items():
        try:
            _compile(source, limits.max_bytes)
        except TemplateError as exc:
            raise TemplateError(f"{field}: {exc}") from None
    return {}


def _render(
    sources: dict[str, str],
    variables: dict[str, Any],
    limits: Limits,
    missing_hint: str = "post JSON that has it",
) -> dict[str, str]:
    rendered: dict[str, str] = {}
    total = 0
    for field, source in sources.items():
        try:
            chunks = []
            # Output is counted as it is made, so a loop that writes without end stops at
            # the limit instead of when the memory runs out.
            for chunk in _compile(source, limits.max_bytes).generate(variables):
                total += len(chunk.encode())
                if total > limits.max_bytes:
                    raise TemplateError(
                        f"renders to more than {limits.max_bytes} bytes "
                        "(PROMPTQ_TEMPLATE_MAX_BYTES)"
                    )
                chunks.append(chunk)
            rendered[field] = "".join(chunks)
        except UndefinedError as exc:
            raise TemplateError(f"{field}: {exc.message}; {missing_hint}") from None
        except SecurityError as exc:
            raise TemplateError(f"{field}: refused: {exc}") from None
        except TemplateError as exc:
            raise TemplateError(f"{field}: {exc}") from None
        except MemoryError:
            raise TemplateError(
                f"{field}: needs more memory than a template may use "
                f"({_memory_budget(limits) // (1024 * 1024)} MiB)"
            ) from None
        except RecursionError:
            raise TemplateError(f"{field}: nests or recurses too deeply") from None
        except Exception as exc:
            raise TemplateError(f"{field}: {type(exc).__name__}: {exc}") from None
    return rendered


def check_here(sources: dict[str, str], limits: Limits) -> None:
    """check, in this process: for the command line (see render_here)."""
    _check(sources, limits)


def render_here(
    sources: dict[str, str], variables: dict[str, Any], limits: Limits, missing_hint: str
) -> dict[str, str]:
    """Rendered in this process, with the same sandbox and limits on output but no time
    limit: for the command line (`promptq run`), whose templates and rows are its own
    user's, where a process per row would cost more than the rendering."""
    _check(sources, limits)
    return _render(sources, variables, limits, missing_hint)


def check(sources: dict[str, str], limits: Limits) -> None:
    """Compile each template (for its syntax) in a child process; TemplateError names the
    field and the line."""
    _run(_check, (sources, limits), limits)


def render(sources: dict[str, str], variables: dict[str, Any], limits: Limits) -> dict[str, str]:
    """Each template rendered with `variables`, in a child process within `limits`."""
    return _run(_render, (sources, variables, limits), limits)


_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload([__name__])
_slots = threading.BoundedSemaphore(CONCURRENT_RENDERS)


def _memory_budget(limits: Limits) -> int:
    return MEMORY_HEADROOM_BYTES + 8 * limits.max_bytes


def _run(
    work: Callable[..., dict[str, str]], args: tuple[Any, ...], limits: Limits
) -> dict[str, str]:
    with _slots:
        receiving, sending = _context.Pipe(duplex=False)
        child = _context.Process(target=_child, args=(sending, work, args, limits), daemon=True)
        child.start()
        sending.close()
        try:
            return _outcome(receiving, limits)
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            receiving.close()


def _outcome(receiving: Connection, limits: Limits) -> dict[str, str]:
    try:
        if not receiving.poll(START_TIMEOUT_SECONDS):
            raise TemplateError("the template renderer did not start; try again")
        receiving.recv()  # started: from here on the time is the template's
        if not receiving.poll(limits.max_ms / 1000):
            raise TemplateError(
                f"took longer than {limits.max_ms} ms to render (PROMPTQ_TEMPLATE_MAX_MS)"
            )
        status, value = receiving.recv()
    except EOFError:
        # Killed from outside (the kernel's OOM killer) or crashed past the MemoryError.
        raise TemplateError(
            f"needs more memory than a template may use "
            f"({_memory_budget(limits) // (1024 * 1024)} MiB)"
        ) from None
    if status == "error":
        raise TemplateError(value)
    return value  # type: ignore[no-any-return]


def _child(
    sending: Connection, work: Callable[..., dict[str, str]], args: tuple[Any, ...], limits: Limits
) -> None:
    _cap_memory(_memory_budget(limits))
    sending.send(("started", None))
    try:
        sending.send(("ok", work(*args)))
    except TemplateError as exc:
        sending.send(("error", str(exc)))
    except MemoryError:
        sending.send(("error", "needs more memory than a template may use"))
    except RecursionError:
        sending.send(("error", "nests too deeply"))


def _cap_memory(budget: int) -> None:
    """The child's address space: what it maps now plus `budget`. Linux only; elsewhere the
    time limit alone bounds a template."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + budget, mapped + budget))
    except (ImportError, OSError, ValueError):
        pass
