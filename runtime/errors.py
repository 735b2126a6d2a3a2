"""The one root of the project's user errors.

Every error that a user can cause (a bad artifact, checkpoint, request, option or data file) derives
from ``NezhaError``; every CLI turns one into a one-line ``error: ...`` message and exit code 2.
Anything else is a bug and keeps its traceback. Subclasses also derive from ``ValueError`` or
``RuntimeError`` so that callers written against those keep working."""


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
