"""The fused mixture ops: thin wrappers over ``torch.ops.memdec_fast.*``.

Beside them in this package: :mod:`~memdec_fast.ops.reference` (their plain-PyTorch twins, the "right" answers),
:mod:`~memdec_fast.ops.params` (the argument checks both share) and :mod:`~memdec_fast.ops.build_info` (what the
compiled extension was built with).

Each op reads both models' logits once per pass and never materialises the two
softmaxes. When the compiled extension ``memdec_fast._C`` could not be loaded,
the same functions run the plain-PyTorch twins in :mod:`memdec_fast.reference`
(with one warning at import); :func:`require_compiled` turns that into an error
for callers that must have the fast path.

The mixture, for each row::

    p = (1 - lmbda) * softmax(base_logits / base_temp) + lmbda * softmax(mem_logits / knn_temp)

Sampling parameters may be Python numbers (one value for the batch) or tensors
of shape [B] (one value per row), so one batch can mix requests.
"""

from __future__ import annotations

import os
import warnings

import torch

from memdec_fast.ops import reference
from memdec_fast.ops.params import Param, check_devices, check_logits, check_params, check_targets

_LOAD_ERROR: Exception | None = None
try:
    if os.environ.get("MEMDEC_FAST_DISABLE_EXTENSION", "0") not in ("", "0"):
        raise ImportError("disabled by MEMDEC_FAST_DISABLE_EXTENSION")
    from memdec_fast import _C  # noqa: F401  (importing it registers the ops)
except ImportError as err:  # missing, built for another torch, or disabled
    _LOAD_ERROR = err
    warnings.warn(
        f"memdec_fast: the compiled extension could not be loaded ({err}); "
        "using the plain-PyTorch reference ops instead",
        RuntimeWarning,
        stacklevel=2,
    )

# A CPU-only build (the default without a visible GPU) has no CUDA kernels: CUDA tensors then take the reference
# ops, with one warning at the first such call that says how to compile them.
_CUDA_KERNELS = _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("memdec_fast::sample", "CUDA")
_NO_CUDA_KERNELS = (
    "memdec_fast: this build of the extension has no CUDA kernels (build_info()['cuda_choice'] says why: by default "
    "they are compiled only where a GPU is visible). Rebuild them with `MEMDEC_FAST_CUDA=1 pip install .` (add "
    "--no-build-isolation to build against the torch installed here)"
)
_warned_no_cuda = False


def _use_reference(logits: torch.Tensor) -> bool:
    """True when the reference ops must run: no extension, or a CUDA tensor and a build without CUDA kernels."""
    global _warned_no_cuda
    if _LOAD_ERROR is not None:
        return True
    if logits.is_cuda and not _CUDA_KERNELS:
        if not _warned_no_cuda:
            _warned_no_cuda = True
            warnings.warn(_NO_CUDA_KERNELS + "; using the plain-PyTorch reference ops on CUDA tensors meanwhile",
                          RuntimeWarning, stacklevel=3)
        return True
    return False


__all__ = [
    "ROW_PARAM_COLUMNS",
    "compiled_available",
    "joint_logprobs",
    "pack_row_params",
    "require_compiled",
    "sample",
    "sample_rows",
    "target_logprobs",
]

ROW_PARAM_COLUMNS = ("lmbda", "knn_temp", "base_temp", "temperature", "top_k", "top_p", "min_p")
"""Column order of the packed per-row parameter tensor [B, 7] float32."""

_DEFAULTS = {"lmbda": 0.0, "knn_temp": 1.0, "base_temp": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def compiled_available() -> bool:
    """True when the compiled extension loaded and its ops are registered."""
    return _LOAD_ERROR is None


def require_compiled() -> None:
    """Raise RuntimeError, with the reason, when the compiled extension is missing."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "memdec_fast: the compiled extension memdec_fast._C is not available "
            f"({_LOAD_ERROR}). Reinstall with `pip install .` from a checkout, or use the reference ops."
        ) from _LOAD_ERROR


def pack_row_params(rows: int, device: torch.device | str, **values: Param) -> torch.Tensor:
    """Pack scalar or per-row parameters into one float32 tensor [rows, 7].

    Columns follow :data:`ROW_PARAM_COLUMNS`; missing ones take their defaults
    (lmbda defaults to 0). top_k is stored as a float, exact up to 2**24.
    Values are not checked (this is the hot path); names are: an unknown one
    raises TypeError.
    """
    unknown = [name for name in values if name not in _DEFAULTS]
    if unknown:
        raise TypeError(f"pack_row_params: unknown parameter {unknown[0]!r}; the parameters are "
                        f"{', '.join(ROW_PARAM_COLUMNS)}")
    out = torch.empty((rows, len(ROW_PARAM_COLUMNS)), dtype=torch.float32, device=device)
    for col, name in enumerate(ROW_PARAM_COLUMNS):
        value = values.get(name, _DEFAULTS[name])
        if isinstance(value, torch.Tensor):
            out[:, col].copy_(value, non_blocking=True)
        else:
            out[:, col].fill_(float(value))
    return out


def _row_params(rows: int, device: torch.device, values: dict[str, Param]) -> torch.Tensor | None:
    """A packed [rows, 7] tensor when any parameter is per-row, else None."""
    if any(isinstance(v, torch.Tensor) for v in values.values()):
        return pack_row_params(rows, device, **values)
    return None


def joint_logprobs(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
) -> torch.Tensor:
    """log p of the mixture over the whole vocabulary.

    Parameters
    ----------
    base_logits, mem_logits : Tensor [B, V]
        float32, float16 or bfloat16 (the two may differ); rows may be strided.
    lmbda : float or Tensor [B]
        Weight of the memory, in [0, 1].
    knn_temp, base_temp : float or Tensor [B]
        Softmax temperatures of the memory and the base, in (0, 3.4e38] (float32's
        largest). Any of them gives finite log-probs: logits are scaled as (x - max) / temp.

    Returns
    -------
    Tensor [B, V] float32
        log p. Rows with NaN or +inf logits, or all -inf, are NaN. Differentiable
        with respect to the logits and to tensor lmbda, knn_temp and base_temp.

    Example
    -------
    >>> logp = joint_logprobs(torch.randn(2, 10), torch.randn(2, 10), lmbda=0.25)
    """
    if _use_reference(base_logits):
        return reference.joint_logprobs(base_logits, mem_logits, lmbda, knn_temp, base_temp)
    check_logits(base_logits, mem_logits)
    values = {"lmbda": lmbda, "knn_temp": knn_temp, "base_temp": base_temp}
    check_params(base_logits.shape[0], **values)
    rp = _row_params(base_logits.shape[0], base_logits.device, values)
    return torch.ops.memdec_fast.joint_logprobs.default(
        base_logits, mem_logits, rp, *(_scalar(values, n) for n in ("lmbda", "knn_temp", "base_temp"))
    )


def target_logprobs(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    targets: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of given target tokens, without an [N, V] output.

    Parameters
    ----------
    base_logits, mem_logits : Tensor [N, V]
    targets : Tensor [N] int64 or int32, ids in [0, V)
    lmbda, knn_temp, base_temp : as in :func:`joint_logprobs`

    Returns
    -------
    (joint, base, mem) : three float32 tensors [N]
        log p, log p_base and log p_mem of each target. Because base and mem
        are returned, log p for any other lmbda is
        ``logaddexp(log(1 - l) + base, log(l) + mem)`` without re-running models.
        All three are differentiable, as in :func:`joint_logprobs`.

    Example
    -------
    >>> joint, base, mem = target_logprobs(torch.randn(3, 10), torch.randn(3, 10), torch.tensor([1, 2, 3]), 0.5)
    """
    if _use_reference(base_logits):
        return reference.target_logprobs(base_logits, mem_logits, targets, lmbda, knn_temp, base_temp)
    check_logits(base_logits, mem_logits)
    check_targets(targets, base_logits)
    values = {"lmbda": lmbda, "knn_temp": knn_temp, "base_temp": base_temp}
    check_params(base_logits.shape[0], **values)
    rp = _row_params(base_logits.shape[0], base_logits.device, values)
    return tuple(
        torch.ops.memdec_fast.target_logprobs.default(
            base_logits, mem_logits, targets.long(), rp, *(_scalar(values, n) for n in ("lmbda", "knn_temp", "base_temp"))
        )
    )


def sample(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row from the mixture, in one fused pass.

    Hugging Face generate's semantics, applied to log p as the logits, in this
    order: temperature; top-k (ties with the k-th value kept); top-p (a token is
    kept when the tokens strictly more likely than it hold less than top_p of
    the mass, so the best token always survives); min-p. temperature == 0 is
    greedy: the argmax of p, the first index on ties. top_k=0, top_p=1 and
    min_p=0 disable their filters.

    Randomness is counter-based Philox seeded from `generator` (or the default
    generator of the logits' device): a seeded generator gives the same tokens
    run after run, rows draw independently, and on CUDA the seed and offset are
    read from device memory, so CUDA-graph replays draw fresh numbers.

    Parameters
    ----------
    base_logits, mem_logits : Tensor [B, V]
    lmbda, knn_temp, base_temp, temperature, top_p, min_p : float or Tensor [B]
    top_k : int or integer Tensor [B]
    generator : torch.Generator, optional

    Returns
    -------
    tokens : Tensor [B] int64
        -1 for rows whose logits are invalid (NaN, +inf, or all -inf).
    logprobs : Tensor [B] float32
        log p of each chosen token under the unfiltered mixture (NaN if invalid).

    Neither output requires grad: sampling is not differentiable (use
    :func:`target_logprobs` on the tokens for a differentiable log p).

    Example
    -------
    >>> tokens, logprobs = sample(torch.randn(4, 100), torch.randn(4, 100), lmbda=0.3, top_p=0.9)
    """
    if _use_reference(base_logits):
        return reference.sample(
            base_logits, mem_logits, lmbda, knn_temp, base_temp, temperature, top_k, top_p, min_p, generator
        )
    check_logits(base_logits, mem_logits)
    values = {
        "lmbda": lmbda, "knn_temp": knn_temp, "base_temp": base_temp, "temperature": temperature,
        "top_k": top_k, "top_p": top_p, "min_p": min_p,
    }
    check_params(base_logits.shape[0], **values)
    rp = _row_params(base_logits.shape[0], base_logits.device, values)
    return tuple(
        torch.ops.memdec_fast.sample.default(
            base_logits, mem_logits, rp, *(_scalar(values, n) for n in ROW_PARAM_COLUMNS), generator
        )
    )


def sample_rows(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    row_params: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` with parameters already packed by :func:`pack_row_params`.

    This is the hot-path entry for callers that keep a static [B, 7] parameter
    buffer (the CUDA-graph decode step): it checks shapes and devices, not
    values, and never synchronises. Requires the compiled extension.
    """
    require_compiled()
    if base_logits.is_cuda and not _CUDA_KERNELS:
        raise RuntimeError(_NO_CUDA_KERNELS + ", or use ops.sample on CUDA tensors")
    check_devices(base_logits, mem_logits=mem_logits, row_params=row_params)
    return tuple(
        torch.ops.memdec_fast.sample.default(base_logits, mem_logits, row_params, 0.0, 1.0, 1.0, 1.0, 0, 1.0, 0.0, generator)
    )


def _scalar(values: dict[str, Param], name: str) -> float | int:
    """The scalar form of a parameter (ignored by the kernel when row_params is given)."""
    v = values[name]
    if isinstance(v, torch.Tensor):
        return _DEFAULTS[name]
    return int(v) if name == "top_k" else float(v)


def _check_fake(base_logits, mem_logits, row_params, targets=None) -> None:
    """The fake kernels' checks. The Meta kernel also runs when any input is a meta tensor
    and the others are not: it must refuse to allocate then, not hand out garbage."""
    check_devices(base_logits, mem_logits=mem_logits, row_params=row_params, targets=targets)
    torch._check(base_logits.dim() == 2 and base_logits.shape == mem_logits.shape)
    if row_params is not None:
        torch._check(row_params.shape == (base_logits.shape[0], len(ROW_PARAM_COLUMNS)))


def _row_param_values(row_params: torch.Tensor | None, lmbda: float, knn_temp: float, base_temp: float):
    """lmbda, knn_temp and base_temp as the kernel reads them: columns [B] of the table, or the scalars."""
    if row_params is None:
        return lmbda, knn_temp, base_temp
    return row_params[:, 0], row_params[:, 1], row_params[:, 2]


def _setup_context(ctx, inputs, output) -> None:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) or t is None]  # logits, [targets], row_params
    ctx.save_for_backward(*tensors)
    ctx.scalars = inputs[len(tensors):]


def _input_grads(ctx, grads, row_params: torch.Tensor | None, row_params_index: int) -> tuple:
    """(d base_logits, d mem_logits, d row_params) from mixture_vjp's gradients, None where not needed."""
    d_base, d_mem, *d_params = grads
    d_rp = None
    if row_params is not None and ctx.needs_input_grad[row_params_index]:
        d_rp = torch.zeros_like(row_params)
        for col, d in enumerate(d_params):  # lmbda, knn_temp, base_temp: ROW_PARAM_COLUMNS[:3]
            d_rp[:, col] = d
    return (d_base if ctx.needs_input_grad[0] else None, d_mem if ctx.needs_input_grad[1] else None, d_rp)


def _joint_logprobs_backward(ctx, grad):
    base, mem, rp = ctx.saved_tensors
    d_base, d_mem, d_rp = _input_grads(
        ctx, reference.mixture_vjp(base, mem, *_row_param_values(rp, *ctx.scalars), grad), rp, 2)
    return d_base, d_mem, d_rp, None, None, None


def _target_logprobs_backward(ctx, grad_joint, grad_base, grad_mem):
    base, mem, targets, rp = ctx.saved_tensors

    def dense(g):  # [N] at the targets -> [N, V]
        return torch.zeros(base.shape, dtype=g.dtype, device=g.device).scatter_(1, targets[:, None], g[:, None])

    grads = reference.mixture_vjp(base, mem, *_row_param_values(rp, *ctx.scalars), dense(grad_joint),
                                  dense(grad_base), dense(grad_mem))
    d_base, d_mem, d_rp = _input_grads(ctx, grads, rp, 3)
    return d_base, d_mem, None, d_rp, None, None, None


if _LOAD_ERROR is None:

    @torch.library.register_fake("memdec_fast::joint_logprobs")
    def _joint_logprobs_fake(base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp):
        _check_fake(base_logits, mem_logits, row_params)
        return base_logits.new_empty(base_logits.shape, dtype=torch.float32)

    @torch.library.register_fake("memdec_fast::target_logprobs")
    def _target_logprobs_fake(base_logits, mem_logits, targets, row_params, lmbda, knn_temp, base_temp):
        _check_fake(base_logits, mem_logits, row_params, targets)
        torch._check(targets.shape == base_logits.shape[:1])
        return tuple(base_logits.new_empty(base_logits.shape[:1], dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("memdec_fast::sample")
    def _sample_fake(
        base_logits, mem_logits, row_params, lmbda, knn_temp, base_temp, temperature, top_k, top_p, min_p, generator
    ):
        _check_fake(base_logits, mem_logits, row_params)
        rows = base_logits.shape[:1]
        return base_logits.new_empty(rows, dtype=torch.int64), base_logits.new_empty(rows, dtype=torch.float32)

    # Gradients of the log-prob ops, for the logits and for a row_params table (lmbda and the two temperatures).
    # sample is not differentiable: its outputs never require grad (csrc/ops.cpp).
    torch.library.register_autograd("memdec_fast::joint_logprobs", _joint_logprobs_backward,
                                    setup_context=_setup_context)
    torch.library.register_autograd("memdec_fast::target_logprobs", _target_logprobs_backward,
                                    setup_context=_setup_context)
