"""A spinning barrier for threads inside compiled code (Numba source, like exports.py).

The compiled one-token step runs on every pool thread at once and meets at a barrier between
the stages of each layer (about 300 per token). A Python hand-off costs 15-25 us; this barrier
costs about 0.15 us on two cores, because nobody sleeps: waiters spin on an atomic load (after
many spins they also call sched_yield, so an oversubscribed machine still makes progress).

Numba has no atomics for the CPU target, so the three used here are LLVM instructions emitted
by intrinsics; they compile the same way under the JIT and numba.pycc.
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ggufile.runtime.kernels.step_layout import S_ABORT, S_COUNT, S_GENERATION

# Spins before a waiter starts yielding its core: ~10-50 us, longer than any stage's imbalance
# on a quiet machine, short next to a time slice.
SPINS_BEFORE_YIELD = 20000

_ARM = platform.machine().lower() in ("aarch64", "arm64")
_sched_yield = types.ExternalFunction("sched_yield", types.int32())


def _element_pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index])


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value atomically (sequentially consistent); returns the old value."""
    sig = types.int64(array, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index], read atomically with acquire order (sees the writes before a release)."""
    sig = types.int64(array, types.intp)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (x86 PAUSE, Arm YIELD): a waiting thread yields the core's resources
    to a sibling hardware thread and leaves the loop without a memory-order mis-speculation."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        name = "llvm.aarch64.hint" if _ARM else "llvm.x86.sse2.pause"
        if _ARM:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]), name)
            builder.call(fn, [ir.Constant(ir.IntType(32), 1)])  # hint #1 = YIELD
        else:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), name)
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def barrier(sync, n_threads):
    """Wait until all n_threads threads arrive. False if the round was aborted (sync[S_ABORT]).

    Generation counting: the last to arrive resets the count and bumps the generation, which
    releases the others; the atomics order every thread's earlier writes before its arrival.
    """
    if n_threads == 1:
        return True
    generation = atomic_load(sync, S_GENERATION)
    if atomic_add(sync, S_COUNT, 1) == n_threads - 1:
        atomic_add(sync, S_COUNT, -n_threads)
        atomic_add(sync, S_GENERATION, 1)
        return atomic_load(sync, S_ABORT) == 0
    spins = 0
    while atomic_load(sync, S_GENERATION) == generation:
        if atomic_load(sync, S_ABORT) != 0:
            return False
        cpu_relax()
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            _sched_yield()
    return atomic_load(sync, S_ABORT) == 0
