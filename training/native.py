"""The C row kernel of the fused loss (rows.c), compiled on first use and loaded with ctypes.

The build needs only a C compiler (`cc`, or $CC): no Python headers, no torch headers. The
library is kept in $XDG_CACHE_HOME/babylm-kd (default ~/.cache/babylm-kd), named by a
hash of the source, the flags and this CPU's instruction-set flags (it is built with
-march=native, so a home directory shared by different machines gets one library per kind of
CPU). It is written to a temporary name and renamed into place, so ranks that build at once
never load a half-written file; a file there that does not load is built again.

Without a compiler, or with BABYLM_KD_NATIVE=0, `rows_kernel()` is None and the loss runs as
torch ops (one line on stderr says so); on a GPU the kernel is never used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("rows.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-shared", "-fPIC", "-pthread")
"""-march=native for the vector width; reassociation so the row sums vectorise (rows.c says why
not -ffast-math)."""


class _Teacher(ctypes.Structure):
    """rows.c's Teacher: pointers into the tensors of one call."""

    _fields_ = [("k", ctypes.c_int64), ("ids", ctypes.c_void_p), ("log_p", ctypes.c_void_p),
                ("p_tail", ctypes.c_void_p),
                ("inv_temperature", ctypes.c_float), ("roots", ctypes.c_int),
                ("tail_floor", ctypes.c_float)]


class TeacherRows(NamedTuple):
    """The teacher side of a cached-KD call: head_ids (N, k) int64, log_p (N, k), p_tail (N,)
    (see losses.ce_and_cached_kl), and the constants."""

    head_ids: torch.Tensor
    log_p: torch.Tensor
    p_tail: torch.Tensor
    temperature: float
    roots: int
    tail_floor: float

    def struct(self) -> _Teacher:
        return _Teacher(self.head_ids.shape[1], self.head_ids.data_ptr(), self.log_p.data_ptr(),
                        self.p_tail.data_ptr(), 1.0 / self.temperature,
                        self.roots, self.tail_floor)


class _Call(ctypes.Structure):
    """rows.c's Call: pointers into the tensors of one forward or backward."""

    _fields_ = [("x", ctypes.c_void_p), ("rows", ctypes.c_int64), ("vocab", ctypes.c_int64),
                ("labels", ctypes.c_void_p), ("teacher", ctypes.POINTER(_Teacher)),
                *[(name, ctypes.c_void_p) for name in
                  ("lse", "ce", "lse_tempered", "q", "tail", "kl", "grad_ce", "grad_kl", "grad")]]


class RowsKernel:
    """rows.c's fused_forward, fused_backward, teacher_buckets, sampled_targets and
    mixture_targets over torch tensors; rows.c has the maths.

    Every tensor is contiguous on the CPU, float32 but for the int64 labels and ids
    (`fits_kernel`). Both split the rows over torch.get_num_threads() threads where there is
    enough work.
    """

    def __init__(self, library: ctypes.CDLL):
        self._forward, self._backward = library.fused_forward, library.fused_backward
        for function in (self._forward, self._backward):
            function.argtypes = [ctypes.POINTER(_Call), ctypes.c_int]
            function.restype = ctypes.c_int
        self._buckets = library.teacher_buckets
        self._buckets.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                  ctypes.c_void_p, ctypes.c_void_p]
        self._sampled = library.sampled_targets
        self._sampled.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_float, ctypes.c_void_p]
        self._mixture = library.mixture_targets
        self._mixture.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p]
        self._mixture.restype = ctypes.c_int

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                teacher: TeacherRows | None) -> dict[str, torch.Tensor]:
        """lse and ce (N,); with a teacher also lse_tempered (N,), q (N, k), tail (N,), kl (N,)."""
        n = logits.shape[0]
        names = ("lse", "ce") if teacher is None else ("lse", "ce", "lse_tempered", "tail", "kl")
        out = {name: logits.new_empty(n) for name in names}
        if teacher is not None:
            out["q"] = logits.new_empty(n, teacher.head_ids.shape[1])
        if self._forward(_call(logits, labels, teacher, out), torch.get_num_threads()):
            raise IndexError("a label or teacher id is outside the vocabulary of "
                             f"{logits.shape[1]}")  # where torch's gather would raise
        return out

    def backward(self, logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherRows | None,
                 forward: dict[str, torch.Tensor], grad_ce: torch.Tensor,
                 grad_kl: torch.Tensor | None) -> torch.Tensor:
        """The (N, V) gradient of sum grad_ce * ce + grad_kl * kl, from `forward`'s outputs."""
        grad = torch.empty_like(logits)
        call = _call(logits, labels, teacher,
                     {**forward, "grad_ce": grad_ce, "grad_kl": grad_kl, "grad": grad})
        self._backward(call, torch.get_num_threads())
        return grad

    def teacher_buckets(self, logits: torch.Tensor, lse: torch.Tensor, *, column: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_p (..., k), p_tail (...)) from cached logits (..., k) and lse (..., n_T) at the
        stored temperature lse[..., column]: see losses.teacher_buckets."""
        log_p, k = torch.empty_like(logits), logits.shape[-1]
        p_tail = logits.new_empty(logits.shape[:-1])
        self._buckets(logits.data_ptr(), lse[..., column:].data_ptr(), lse.shape[-1],
                      logits.numel() // k, k, 1.0 / temperature, log_p.data_ptr(), p_tail.data_ptr())
        return log_p, p_tail

    def sampled_targets(self, ids: torch.Tensor, logits: torch.Tensor | None, *, scale: float
                        ) -> torch.Tensor:
        """log_p shaped as ids (..., m), m >= 1: see losses.sampled_targets, with scale =
        1/T - 1/T_s (logits None: scale 0, where rows.c does not read them)."""
        log_p, m = torch.empty(ids.shape), ids.shape[-1]
        self._sampled(ids.data_ptr(), _address(logits), ids.numel() // m, m, scale,
                      log_p.data_ptr())
        return log_p


    def mixture_targets(self, members: list[tuple[torch.Tensor, torch.Tensor]],
                        weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log_p) shaped (..., k_1 + ... + k_n) from each member's (ids, log_p) (..., k_i)
        and weight: each distinct id once with the log of its mixed probability, in first-slot
        order, the last repeated over the slots left (see losses.mixture_targets)."""
        n = len(members)
        widths = [member_ids.shape[-1] for member_ids, _ in members]
        shape = (*members[0][0].shape[:-1], sum(widths))
        vocab = max(int(member_ids.max()) for member_ids, _ in members) + 1
        ids, log_p, scratch = torch.empty(shape, dtype=torch.int64), torch.empty(shape), \
            torch.zeros(vocab)
        if self._mixture((ctypes.c_void_p * n)(*(m.data_ptr() for m, _ in members)),
                         (ctypes.c_void_p * n)(*(lp.data_ptr() for _, lp in members)),
                         (ctypes.c_float * n)(*weights), (ctypes.c_int64 * n)(*widths), n,
                         ids.numel() // shape[-1], vocab, scratch.data_ptr(), ids.data_ptr(),
                         log_p.data_ptr()):
            raise IndexError("a cached teacher id is negative")
        return ids, log_p


def _call(logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherRows | None,
          tensors: dict[str, torch.Tensor | None]):
    call = _Call(logits.data_ptr(), logits.shape[0], logits.shape[1], labels.data_ptr(),
                 None if teacher is None else ctypes.pointer(teacher.struct()))
    for name, tensor in tensors.items():
        setattr(call, name, _address(tensor))
    return ctypes.byref(call)


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def fits_kernel(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel can take these tensors (None: absent): contiguous float32 or int64
    (labels, ids) on the CPU."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64)
                             and t.is_contiguous()) for t in tensors)


_torch_ops_only = threading.local()


@contextlib.contextmanager
def torch_ops_only():
    """Within it (in this thread) `rows_kernel()` is None: tests and benchmarks compare the
    kernel with the torch ops."""
    before = getattr(_torch_ops_only, "on", False)
    _torch_ops_only.on = True
    try:
        yield
    finally:
        _torch_ops_only.on = before


def rows_kernel() -> RowsKernel | None:
    """The compiled kernel, built on first call; None where it cannot be or is not wanted (see
    the module doc and `torch_ops_only`)."""
    if getattr(_torch_ops_only, "on", False) or os.environ.get("BABYLM_KD_NATIVE", "1") == "0":
        return None
    return _load()


@functools.cache
def _load() -> RowsKernel | None:
    compiler = shlex.split(os.environ.get("CC", "cc"))
    try:
        return RowsKernel(_open(compiler))
    except (OSError, subprocess.CalledProcessError) as error:
        why = (getattr(error, "stderr", None) or str(error)).strip().splitlines()
        print(f"babylm-kd: the C loss kernel could not be built ({why[-1] if why else error}); "
              "the loss runs as torch ops, slower on a CPU", file=sys.stderr)
        return None


def _open(compiler: list[str]) -> ctypes.CDLL:
    """The library for this source, flags and CPU: loaded from the cache, else built there."""
    recipe = [SOURCE.read_bytes(), " ".join([*compiler, *FLAGS]).encode(),
              platform.machine().encode(), _cpu_flags()]
    key = hashlib.sha256(b"\0".join(recipe)).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "babylm-kd"
    library = cache / f"rows-{key}.so"
    if library.exists():
        try:
            return ctypes.CDLL(str(library))
        except OSError:
            pass  # a damaged file (say, truncated on a full disk by a copy): built again below
    cache.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=cache, prefix=library.stem, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    return ctypes.CDLL(str(library))


def _cpu_flags() -> bytes:
    """The CPU's instruction-set flags (Linux), so -march=native builds are not shared across
    kinds of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
