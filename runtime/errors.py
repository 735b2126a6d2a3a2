"""The one root of the project's user errors.

Every error that a user can cause (a bad artifact, checkpoint, request, option or data file) derives
from ``NezhaError``; every CLI turns one into a one-line ``error: ...`` message and exit code 2.
Anything else is a bug and keeps its traceback. Subclasses also derive from ``ValueError`` or
``RuntimeError`` so that callers written against those keep working."""

import reprlib

_SHORT = reprlib.Repr()          # Python 3.11's Repr takes its limits as attributes
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, 60, 40, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6
MAX_INT_BITS = 4000              # repr() of a larger int costs quadratic time (or raises past 4300 digits)


def clipped(value) -> str:
    """``repr(value)`` for an error message, at most a few hundred characters and built in time bounded by
    that, not by the value: ``{k!r}`` of a 524k-element list sent as ``k`` took ~60 ms of the GIL, which
    every other request of a server waited for (reprlib stops at the first elements)."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        return f"<an integer of {value.bit_length()} bits>"
    return _SHORT.repr(value)


class NezhaError(Exception):
    """A user error: the message names the problem and what is allowed."""


class BackendUnavailable(NezhaError, RuntimeError):
    """A backend or device this machine cannot provide (no CUDA provider, no TensorRT); says how to get it."""


class GraphRunError(NezhaError, RuntimeError):
    """A graph that failed while running a feed its runner accepted: graphs that do not fit their manifest
    (an edited layout naming tokens beyond the embedding), or the device (out of memory). One line for the
    CLI; a server answers it 500 (the server's fault, not the request's), never 400."""


class OptionError(NezhaError, ValueError):
    """An option outside what is allowed (device names, backends); the message lists the allowed values."""
