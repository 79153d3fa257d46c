"""What an exception from a config's launch means: it did not compile, it ran out of resources, or
it broke the CUDA context. The dispatcher (fall back to the default config) and the tuner (the
trial's outcome) both classify with these, so a failure counts the same way in both places.
"""
from __future__ import annotations

from functools import lru_cache

# Error texts after which the CUDA context is unusable: the process must be replaced.
_STICKY = ("illegal memory access", "illegal address", "unspecified launch failure", "misaligned address",
           "illegal instruction", "launch failure", "device-side assert", "cuda error", "triton error [cuda]",
           "an illegal", "hardware exception", "context is destroyed")
TRIAL_ERROR_CHARS = 2000  # how much of an error a trial record keeps


@lru_cache(maxsize=None)
def _triton_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    # (out-of-resources types, compile-failure types); names differ across Triton versions, and
    # importing them lazily keeps `import flashtune.kernel.errors` free of triton.
    def found(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
        out = []
        for module, name in names:
            try:
                out.append(getattr(__import__(module, fromlist=[name]), name))
            except (ImportError, AttributeError):
                continue
        return tuple(out)

    return (found((("triton.runtime.errors", "OutOfResources"),)),
            found((("triton.errors", "TritonError"), ("triton.runtime.errors", "PTXASError"),
                   ("triton.compiler.errors", "CompilationError"))))


def is_sticky_cuda_error(error: BaseException) -> bool:
    """Whether `error` leaves the CUDA context unusable (the process must be restarted)."""
    return any(marker in str(error).lower() for marker in _STICKY)


def launch_failure(error: BaseException) -> str | None:
    """The trial outcome an exception from a config's (first) launch stands for, or None.

    "out_of_resources" (shared memory or registers beyond the GPU's), "crashed" (a sticky CUDA
    error), "compile_error" (Triton's front end, an MLIR pass or ptxas rejected it); None when it
    is none of these, e.g. a bug or a bad argument, which no other config would fix.
    """
    out_of_resources, compile_errors = _triton_errors()
    if isinstance(error, out_of_resources):
        return "out_of_resources"
    if is_sticky_cuda_error(error):
        return "crashed"
    # MLIR pass failures reach Python as a bare RuntimeError from the C++ pass manager.
    if isinstance(error, compile_errors) or (isinstance(error, RuntimeError) and "PassManager" in str(error)):
        return "compile_error"
    return None


def trial_error_text(error: BaseException) -> str:
    """`Type: message` with the whole (multi-line) message, capped: what a trial record keeps.

    Unlike db.errors.first_line this keeps the later lines, where e.g. ptxas says why it failed
    ("PTXAS error: Internal Triton PTX codegen error" first, "Insufficient registers" after).
    """
    return f"{type(error).__name__}: {error}"[:TRIAL_ERROR_CHARS]
