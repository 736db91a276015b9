"""The C side of the simulated libnvidia-ml: NVML return codes, writing into the pointers pynvml
passes, the two-call list protocol, and `Exports`, which wraps each implementation in a ctypes
`CFUNCTYPE` callback under the simulation's lock (and blocks it while the simulated driver hangs).
Shared by every symbol area (device, power, events, processes).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from ctypes import CFUNCTYPE, c_int, c_uint, c_ulonglong, c_void_p
from typing import Any

import pynvml

from edge.sim.physics import SimGpu
from shared.logs import get_logger

log = get_logger("edge.sim.lib")

SUCCESS = pynvml.NVML_SUCCESS
UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
INSUFFICIENT_SIZE = pynvml.NVML_ERROR_INSUFFICIENT_SIZE
TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
VERSION_MISMATCH = pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN

NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId outside MIG
MIB = 1024 * 1024

H, P, U, ULL = c_void_p, c_void_p, c_uint, c_ulonglong  # handle, pointer, uint, u64 argument types

# Every callback ever built stays referenced: a thread may still hold one that pynvml fetched
# before an uninstall, and calling a collected callback would crash the interpreter.
_KEEP_ALIVE: list[Any] = []


class Fail(Exception):
    """Raised inside an implementation to return an NVML error code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def put(ctype: Any, address: int | None, value: Any) -> None:
    if not address:
        raise Fail(INVALID_ARGUMENT)
    ctype.from_address(address).value = value


def put_text(address: int | None, size: int, text: str) -> None:
    data = text.encode() + b"\0"
    if not address:
        raise Fail(INVALID_ARGUMENT)
    if len(data) > size:
        raise Fail(INSUFFICIENT_SIZE)
    ctypes.memmove(address, data, len(data))


def as_uint(value: float) -> int:
    """What a C unsigned counter would hold: rounded, never negative."""
    return max(0, round(value))


def unsupported_unless(ok: bool) -> None:
    if not ok:
        raise Fail(NOT_SUPPORTED)


def room_for(count: int | None, out: int | None, needed: int) -> bool:
    """The sizing half of NVML's two-call protocol: `*count` says how many entries the caller's
    buffer holds and is set to how many there are; True when `out` can take them all (fill it),
    False when the caller must ask again with a bigger buffer (INSUFFICIENT_SIZE, unless none)."""
    if not count:
        raise Fail(INVALID_ARGUMENT)
    room = c_uint.from_address(count).value
    c_uint.from_address(count).value = needed
    return bool(out) and room >= needed


def write_list(values: Sequence[int], count: int | None, out: int | None) -> int:
    """The NVML two-call protocol: too small (or no) buffer -> size it, then fill it."""
    if not room_for(count, out, len(values)):
        return INSUFFICIENT_SIZE if values else SUCCESS
    if values and out:  # `out` is set whenever room_for said yes to some values
        (c_uint * len(values)).from_address(out)[:] = list(values)
    return SUCCESS


class SimulatedLib:
    """The object installed as `pynvml.nvmlLib`: C symbol name -> CFUNCTYPE callback."""

    def __init__(self, functions: dict[str, Any]) -> None:
        self.__dict__["_functions"] = functions

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_functions"][name]
        except KeyError:
            raise AttributeError(f"simulated libnvidia-ml has no symbol {name}") from None

    @property
    def symbols(self) -> list[str]:
        return sorted(self.__dict__["_functions"])


class Exports:
    """The symbol table being built: C name -> CFUNCTYPE callback around an implementation.

    Every callback blocks while the simulated driver hangs (`answering` cleared; unless it cannot
    hang), runs under the model lock (unless `locked=False`: it waits on something itself), turns
    `Fail` into its NVML code and any other exception into NVML_ERROR_UNKNOWN."""

    def __init__(self, lock: threading.RLock, answering: threading.Event,
                 gpu: Callable[[int | None], SimGpu]) -> None:
        self.table: dict[str, Any] = {}
        self._lock = lock
        self._answering = answering
        self._gpu = gpu

    def export(self, name: str, argtypes: tuple[type, ...], impl: Callable[..., Any], *,
               locked: bool = True, restype: type = c_int, can_hang: bool = True) -> None:
        prototype = CFUNCTYPE(restype, *argtypes)
        lock, answering = self._lock, self._answering

        def guarded(*args: Any) -> Any:
            if can_hang and not answering.is_set():
                answering.wait()  # a hung driver: block, holding no lock, until released
            try:
                if locked:
                    with lock:
                        return impl(*args)
                return impl(*args)
            except Fail as failure:
                return failure.code
            except Exception:  # a bug here must not read as NVML_SUCCESS
                log.exception("simulated %s failed", name)
                return UNKNOWN if restype is c_int else None

        callback = prototype(guarded)
        _KEEP_ALIVE.append(callback)
        self.table[name] = callback

    def scalar(self, name: str, ctype: Any, read: Callable[[SimGpu], Any]) -> None:
        """A `nvmlReturn_t f(nvmlDevice_t, T *out)` getter."""
        gpu = self._gpu

        def impl(handle: int | None, out: int | None) -> int:
            put(ctype, out, read(gpu(handle)))
            return SUCCESS

        self.export(name, (H, P), impl)
