"""Typed wrappers over ``torch.ops.landscape_ext.*`` and their fake (meta) kernels.

This is the only module that touches ``torch.ops.landscape_ext``; everything else in the
library calls the functions below. Each op has a plain-PyTorch reference of the same name in
:mod:`landscape_ext.reference`. Ops that have both a kernel and a composite worth running take
``impl="auto" | "fused" | "composite"``; :data:`IMPL_DEFAULTS` and :func:`resolve_impl` decide
what ``"auto"`` runs.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _C, _krylov_driver, reference  # noqa: F401 (_C: loading it registers the ops)
from ._extension import activation_codes, registered_kernels
from .reference import _einsum_positions

_lib = torch.ops.landscape_ext

# The kernels of block_orthonormalize and orthogonalize_batched are Python drivers
# (_krylov_driver.py: CholeskyQR2, rank decisions) over compiled passes (the internal ops
# _krylov_*, csrc/krylov.h): registered here for every backend whose passes this build has.
_KRYLOV_PASSES = _krylov_driver.Passes(
    _lib._krylov_coeffs.default, _lib._krylov_project_coeffs.default,
    _lib._krylov_project_gram.default, _lib._krylov_fast_orthonormalize.default,
    tuple(key.lower() for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(
        "landscape_ext::_krylov_fast_orthonormalize", key)))
_krylov_kernels = torch.library.Library("landscape_ext", "IMPL")


def _block_orthonormalize_kernel(basis, block, n_basis, rank_tol=-1.0, rounds=2, local_rows=0):
    return _krylov_driver.block_orthonormalize(_KRYLOV_PASSES, basis, block, n_basis, rank_tol,
                                               rounds, local_rows)


def _orthogonalize_batched_kernel(bases, vectors, n_basis, rank_tol=-1.0):
    return _krylov_driver.orthogonalize_batched(_KRYLOV_PASSES, bases, vectors, n_basis, rank_tol)


@torch.library.register_fake("landscape_ext::_krylov_coeffs")
def _krylov_coeffs_fake(basis, block, n):
    return block.new_empty((block.shape[0], n, block.shape[1]))


@torch.library.register_fake("landscape_ext::_krylov_project_coeffs")
def _krylov_project_coeffs_fake(basis, block, coeffs, n):
    R, b, d = block.shape
    return block.new_empty((R, b, d)), block.new_empty((R, n, b))


@torch.library.register_fake("landscape_ext::_krylov_project_gram")
def _krylov_project_gram_fake(basis, block, coeffs, n):
    R, b, d = block.shape
    return block.new_empty((R, b, d)), block.new_empty((R, b, b))


_KRYLOV_DEVICE_TYPES = []
for _key in ("CPU", "CUDA"):
    if torch._C._dispatch_has_kernel_for_dispatch_key("landscape_ext::_krylov_coeffs", _key):
        _krylov_kernels.impl("block_orthonormalize", _block_orthonormalize_kernel, _key)
        _krylov_kernels.impl("orthogonalize_batched", _orthogonalize_batched_kernel, _key)
        _KRYLOV_DEVICE_TYPES.append(_key.lower())
del _key


def _direct_krylov_call(a: Tensor, b: Tensor) -> bool:
    """Whether the wrappers may call the krylov driver directly instead of through the op: in
    eager mode on a device with passes (the op's kernel is that same driver; the dispatcher
    round trip into Python costs about as much as a small call's passes). Under torch.compile,
    fake tensors or a subclass, the op itself runs."""
    return (type(a) is Tensor and type(b) is Tensor and a.device.type in _KRYLOV_DEVICE_TYPES
            and not torch.compiler.is_compiling() and not a.requires_grad
            and not b.requires_grad)

# ------------------------------------------------------------------------------------------------
# fused or composite
# ------------------------------------------------------------------------------------------------

#: What ``impl="auto"`` runs, per op and device type: ``"fused"`` (the registered kernel) or
#: ``"composite"`` (the plain-PyTorch reference of the op). A device type not listed gets the
#: composite. Measurements: bench/README.md.
IMPL_DEFAULTS: Dict[str, Dict[str, str]] = {
    # bench/bench_sketch.py: on CPU the fused kernel beats the einsum composite for mid-sized
    # layers (not for every shape: see bench/README.md); on CUDA the composite (cuBLAS) until the
    # kernel has been measured on a GPU.
    "linear_grad_sketch": {"cpu": "fused", "cuda": "composite"},
    # bench/bench_sketch.py: the op's chunked ATen GEMMs against the einsum composite (CPU); on
    # CUDA the op too: the einsum composite materializes an N x l x n_out temporary (about 1 GB
    # at N = 4096, l = 42, n_out = 1536) that the chunked GEMMs never hold.
    "linear_grad_project": {"cpu": "fused", "cuda": "fused"},
    # bench/bench_hvp.py: one pass over the logits, faster than the closed form in torch ops and
    # without its k x N x C temporaries (the memory is the reason on CUDA too, not yet timed).
    "xent_hvp": {"cpu": "fused", "cuda": "fused"},
    # bench/bench_hvp.py: one pass over z for sigma, sigma', sigma'' against the torch
    # composition's several (CPU); CUDA: one elementwise kernel, not yet timed.
    "act_derivs": {"cpu": "fused", "cuda": "fused"},
}

_IMPLS = (None, "auto", "fused", "composite")
# dispatch keys with a kernel, per op: fixed once landscape_ext._C is loaded (its static
# initializers register every kernel), so read once
_KERNEL_KEYS = {op: tuple(keys) for op, keys in registered_kernels().items()}


def resolve_impl(op: str, device: Union[torch.device, str],
                 impl: Optional[str] = "auto") -> str:
    """``"fused"`` or ``"composite"``: what an op called with ``impl`` on ``device`` runs.

    Parameters
    ----------
    op : str
        A key of :data:`IMPL_DEFAULTS`.
    device : torch.device or str
    impl : {"auto", None, "fused", "composite"}
        ``"auto"`` (or None): the entry of :data:`IMPL_DEFAULTS` for the device type (a type not
        listed: ``"composite"``), and ``"composite"`` where that says ``"fused"`` but this build
        has no kernel of the op for the device. ``"fused"`` and ``"composite"``: as asked.

    Raises
    ------
    ValueError
        For an unknown op or impl.
    NotImplementedError
        For ``impl="fused"`` on a device without a kernel of the op.
    """
    table = IMPL_DEFAULTS.get(op)
    if table is None:
        raise ValueError(f"resolve_impl: unknown op {op!r}; one of {sorted(IMPL_DEFAULTS)}")
    if impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be 'auto', 'fused' or 'composite' (None means "
                         f"'auto'), got {impl!r}")
    if impl == "composite":
        return "composite"
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    has_kernel = kind.upper() in _KERNEL_KEYS.get(op, ())
    if impl == "fused":
        if not has_kernel:
            raise NotImplementedError(
                f"{op}: impl='fused' but this build has no {op} kernel for device type "
                f"{kind!r} (kernels for: {', '.join(_KERNEL_KEYS.get(op, ())) or 'none'}); use "
                f"impl='auto' or 'composite'")
        return "fused"
    choice = table.get(kind, "composite")
    return "fused" if choice == "fused" and has_kernel else "composite"


# ------------------------------------------------------------------------------------------------
# krylov: block_orthonormalize
# ------------------------------------------------------------------------------------------------


def block_orthonormalize(basis: Tensor, block: Tensor, n_basis: Optional[int] = None,
                         rank_tol: float = -1.0, rounds: int = 2,
                         local_rows: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Orthonormalize a block against an orthonormal basis and within itself.

    Two rounds of classical Gram-Schmidt against ``basis[:n_basis]`` (CGS2, done in three fused
    passes over the basis) followed by CholeskyQR2 of the remainder, with a row-by-row
    fallback when the remainder is ill-conditioned or rank-deficient:

    .. math::
        \text{block} = C^\top\, Q_{:n} + R^\top q, \qquad q q^\top = I,\quad q\, Q_{:n}^\top = 0

    Parameters
    ----------
    basis : Tensor
        ``(m, d)``; rows ``[:n_basis]`` orthonormal. float64, float32, float16 or bfloat16
        (half storage halves the bytes read: rows are widened in registers).
    block : Tensor
        ``(b, d)``, float32 or float64: the output dtype, and the dtype the passes over the
        basis accumulate in, except that a float64 basis with a float32 block runs in float64
        (and returns float32). Sums over ``d`` are lane-wise partials per column chunk, added in
        a fixed order (results do not depend on the thread count); the ``b x b`` algebra
        (Cholesky factors, their inverses, rank decisions) runs in float64.
    n_basis : int, optional
        How many leading rows of ``basis`` to project against (default: all ``m``).
    rank_tol : float
        A row whose remainder keeps at most ``rank_tol`` of its original norm is numerically
        dependent. Negative (default) selects ``10 * eps`` of the least precise of the two
        dtypes (float32: 1.2e-6, float16: 9.8e-3, bfloat16: 7.8e-2, float64: 2.2e-15).
    rounds : {2, 1}
        2 (default): two rounds of Gram-Schmidt, always. 1: one round (two passes over the
        basis instead of three) and a second one only when some row kept less than
        ``1/sqrt(2)`` of its norm (Daniel-Gragg-Kaufman-Stewart criterion) or, for a basis
        stored in a narrower dtype than the block, when the round's coefficients times the
        basis's unit roundoff exceed the block's rounding. Same accuracy promise; cheaper for
        blocks whose components along the basis are small, such as a Lanczos block once its
        recurrence terms are removed (``local_rows``); four passes when the second round runs.
    local_rows : int
        Project out the last ``local_rows`` rows of ``basis[:n_basis]`` first, by one round
        over just those rows (cheap), before the rounds over the whole basis. For blocks whose
        large components lie along the newest rows: a Lanczos block ``A Q_j`` along the last
        two blocks (what :func:`~landscape_ext.eigsh` passes, with ``rounds=1``).

    Returns
    -------
    q : Tensor
        ``(b, d)`` orthonormal rows, orthogonal to ``basis[:n_basis]``.
    coeffs : Tensor
        ``(n_basis, b)`` projection coefficients.
    r : Tensor
        ``(b, b)`` upper triangular. **Rank convention:** ``r[k, k] == 0`` exactly marks a
        direction lost to rank deficiency; ``q[k]`` is then a fresh direction orthogonal to the
        basis and to ``q[:k]``, and the dropped remainder (at most ``rank_tol * |block[k]|``)
        is the only reconstruction error. :func:`numerical_rank` counts the nonzero diagonal.

    Shapes
    ------
    basis (m, d), block (b, d) -> q (b, d), coeffs (n_basis, b), r (b, b); requires
    ``n_basis + b <= d``.
    """
    if n_basis is None:
        n_basis = basis.shape[0]
    if _direct_krylov_call(basis, block):
        return _block_orthonormalize_kernel(basis, block, int(n_basis), float(rank_tol),
                                            int(rounds), int(local_rows))
    return _lib.block_orthonormalize(basis, block, int(n_basis), float(rank_tol), int(rounds),
                                     int(local_rows))


@torch.library.register_fake("landscape_ext::block_orthonormalize")
def _block_orthonormalize_fake(basis, block, n_basis, rank_tol=-1.0, rounds=2, local_rows=0):
    torch._check(basis.dim() == 2 and block.dim() == 2,
                 lambda: "block_orthonormalize: basis and block must be 2-D")
    b, d = block.shape
    q = block.new_empty((b, d))
    coeffs = block.new_empty((n_basis, b))
    r = block.new_empty((b, b))
    return q, coeffs, r


# ------------------------------------------------------------------------------------------------
# krylov: orthogonalize_batched
# ------------------------------------------------------------------------------------------------


def orthogonalize_batched(bases: Tensor, vectors: Tensor, n_basis: Optional[int] = None,
                          rank_tol: float = -1.0) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Orthogonalize ``r`` vectors, each against its own basis (CGS2), in one call.

    The reorthogonalization step of ``r`` independent Lanczos runs advanced together
    (stochastic Lanczos quadrature with ``r`` probes):

    .. math::
        v_i = c_i^\top B_{i,:n} + \nu_i q_i, \qquad |q_i| = 1,\quad B_{i,:n} q_i = 0

    Parameters
    ----------
    bases : Tensor
        ``(r, m, d)``, rows ``[:n_basis]`` of each run orthonormal; float64/32/16 or bfloat16.
    vectors : Tensor
        ``(r, d)``, float32 or float64.
    n_basis : int, optional
        Leading rows of each basis to use (default ``m``).
    rank_tol : float
        As in :func:`block_orthonormalize`.

    Returns
    -------
    q : Tensor
        ``(r, d)`` unit rows.
    coeffs : Tensor
        ``(r, n_basis)``.
    norms : Tensor
        ``(r,)``; ``norms[i] == 0`` marks a vector numerically inside the span of its basis
        (``q[i]`` is then a fresh unit vector orthogonal to it — a Lanczos run that found an
        invariant subspace).
    """
    if n_basis is None:
        n_basis = bases.shape[1]
    if _direct_krylov_call(bases, vectors):
        return _orthogonalize_batched_kernel(bases, vectors, int(n_basis), float(rank_tol))
    return _lib.orthogonalize_batched(bases, vectors, int(n_basis), float(rank_tol))


@torch.library.register_fake("landscape_ext::orthogonalize_batched")
def _orthogonalize_batched_fake(bases, vectors, n_basis, rank_tol=-1.0):
    torch._check(bases.dim() == 3 and vectors.dim() == 2,
                 lambda: "orthogonalize_batched: bases must be 3-D and vectors 2-D")
    r, d = vectors.shape
    return vectors.new_empty((r, d)), vectors.new_empty((r, n_basis)), vectors.new_empty((r,))


def numerical_rank(r: Tensor) -> int:
    """Numerical rank of a block from the ``r`` factor of :func:`block_orthonormalize`
    (the count of nonzero diagonal entries; see the rank convention there)."""
    return int((torch.diagonal(r) != 0).sum().item())


# ------------------------------------------------------------------------------------------------
# sketch: linear_grad_sketch, linear_grad_project (csrc/sketch.h)
# ------------------------------------------------------------------------------------------------


def linear_grad_sketch(acts: Tensor, out_grads: Tensor, directions: Tensor, *,
                       impl: str = "auto") -> Tensor:
    r"""Sketch per-sample gradients of a Linear layer against ``l`` directions, without forming
    them.

    The per-sample gradient of the weight of a Linear layer (or of a Conv layer after im2col) is
    :math:`g_n = \sum_t e_{n,t} a_{n,t}^\top` (``n_out x n_in``), with ``a`` the layer input and
    ``e`` the gradient of sample ``n``'s loss with respect to the layer output. This op returns

    .. math::
        y_{nj} = \langle g_n, V_j \rangle = \sum_t e_{n,t}^\top V_j\, a_{n,t}

    i.e. ``G V^T`` for the ``N x (n_out n_in)`` per-sample gradient matrix ``G``. With ``T == 1``
    (and whenever ``T l <= T + l + 8``) a fused kernel computes the GEMM ``A V_j^T`` and reduces
    it against ``E`` in registers: the ``(N T, l, n_out)`` temporary of the plain-PyTorch
    composition never exists. For longer sequences the per-sample gradients are formed in
    chunks of samples (cheaper: ``T + l`` instead of ``T l`` multiply-adds per weight).

    Parameters
    ----------
    acts : Tensor
        ``(N, n_in)`` or ``(N, T, n_in)`` layer inputs (a sequence dimension is summed over:
        the per-sample gradient of a weight shared across positions).
    out_grads : Tensor
        ``(N, n_out)`` or ``(N, T, n_out)`` gradients of each sample's loss w.r.t. the layer output.
    directions : Tensor
        ``(l, n_out, n_in)``; any stride in the first dimension.
    impl : {"auto", "fused", "composite"}
        The kernel or :func:`landscape_ext.reference.linear_grad_sketch` (``torch.einsum``);
        ``"auto"``: see :func:`resolve_impl`.

    Returns
    -------
    Tensor
        ``(N, l)``, dtype of the inputs (float32 or float64, all three the same). Differentiable
        in all three inputs.
    """
    if resolve_impl("linear_grad_sketch", acts.device, impl) == "fused":
        return _lib.linear_grad_sketch(acts, out_grads, directions)
    if not torch.compiler.is_compiling():  # the kernels' messages (an op with no fake kernel)
        _lib._check_linear_grad_sketch_args(acts, out_grads, directions)
    return reference.linear_grad_sketch(acts, out_grads, directions)


@torch.library.register_fake("landscape_ext::linear_grad_sketch")
def _linear_grad_sketch_fake(acts, out_grads, directions):
    torch._check(acts.dim() in (2, 3) and out_grads.dim() == acts.dim() and directions.dim() == 3,
                 lambda: "linear_grad_sketch: acts/out_grads must be 2-D or 3-D, directions 3-D")
    return acts.new_empty((acts.shape[0], directions.shape[0]))


def linear_grad_project(acts: Tensor, out_grads: Tensor, weights: Tensor, *,
                        impl: str = "auto") -> Tensor:
    r"""Weighted sums of per-sample Linear-layer gradients, without forming them (the transpose
    of :func:`linear_grad_sketch`):

    .. math::
        P_j = \sum_n w_{nj}\, g_n = \sum_n w_{nj} \sum_t e_{n,t} a_{n,t}^\top

    i.e. ``G^T W`` reshaped to ``(l, n_out, n_in)``. A composite of ATen GEMMs on every backend
    (``(w * E)^T A``, chunked; per-sample gradients formed in chunks when ``T l > T + l + 8``): no
    custom kernel beats the vendor GEMM here.

    Shapes
    ------
    acts ``(N, [T,] n_in)``, out_grads ``(N, [T,] n_out)``, weights ``(N, l)`` ->
    ``(l, n_out, n_in)``; one dtype (float32 or float64). Differentiable. ``impl``: the op or
    :func:`landscape_ext.reference.linear_grad_project` (``torch.einsum``, not chunked), see
    :func:`resolve_impl`.
    """
    if resolve_impl("linear_grad_project", acts.device, impl) == "fused":
        return _lib.linear_grad_project(acts, out_grads, weights)
    if not torch.compiler.is_compiling():
        _lib._check_linear_grad_project_args(acts, out_grads, weights)
    return reference.linear_grad_project(acts, out_grads, weights)


@torch.library.register_fake("landscape_ext::linear_grad_project")
def _linear_grad_project_fake(acts, out_grads, weights):
    torch._check(acts.dim() in (2, 3) and out_grads.dim() == acts.dim() and weights.dim() == 2,
                 lambda: "linear_grad_project: acts/out_grads must be 2-D or 3-D, weights 2-D")
    return acts.new_empty((weights.shape[1], out_grads.shape[-1], acts.shape[-1]))


def _sketch_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _factor_grads(ctx, coef: Tensor, mats: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients with respect to acts and out_grads of ``sum_{n, j} coef[n, j] <g_n, mats[j]>``
    (the first two inputs of both sketch ops)."""
    acts, out_grads, _ = ctx.saved_tensors
    positions = acts.dim() == 3
    d_acts = d_out = None
    if ctx.needs_input_grad[0]:
        d_acts = _einsum_positions("nj,nto,joi->nti", coef, out_grads, mats, positions=positions)
    if ctx.needs_input_grad[1]:
        d_out = _einsum_positions("nj,nti,joi->nto", coef, acts, mats, positions=positions)
    return d_acts, d_out


def _linear_grad_sketch_backward(ctx, gy):
    acts, out_grads, directions = ctx.saved_tensors
    d_acts, d_out = _factor_grads(ctx, gy, directions)
    d_dirs = (_lib.linear_grad_project(acts, out_grads, gy.contiguous())
              if ctx.needs_input_grad[2] else None)
    return d_acts, d_out, d_dirs


def _linear_grad_project_backward(ctx, gp):
    acts, out_grads, weights = ctx.saved_tensors
    d_acts, d_out = _factor_grads(ctx, weights, gp)
    d_w = (_lib.linear_grad_sketch(acts, out_grads, gp.contiguous())
           if ctx.needs_input_grad[2] else None)
    return d_acts, d_out, d_w


torch.library.register_autograd("landscape_ext::linear_grad_sketch", _linear_grad_sketch_backward,
                                setup_context=_sketch_setup_context)
torch.library.register_autograd("landscape_ext::linear_grad_project",
                                _linear_grad_project_backward, setup_context=_sketch_setup_context)


# ------------------------------------------------------------------------------------------------
# hvp: xent_hvp
# ------------------------------------------------------------------------------------------------


def xent_hvp(logits: Tensor, target: Tensor, directions: Tensor, label_smoothing: float = 0.0,
             ignore_index: int = -100, *, impl: str = "auto") -> Tensor:
    r"""Hessian of the mean softmax cross-entropy w.r.t. the logits, applied to k directions.

    For ``loss = F.cross_entropy(logits, target, ignore_index=..., label_smoothing=...)``
    (mean reduction, no class weights), row by row in one pass over the logits:

    .. math::
        \text{out}_{j,n} = \frac{1}{M}\left(p_n \odot r_{j,n} - p_n\, (p_n^\top r_{j,n})\right),
        \qquad p_n = \mathrm{softmax}(\text{logits}_n)

    for the ``M`` rows with ``target[n] != ignore_index``; ignored rows give 0. Label smoothing
    changes the gradient target only, not this Hessian (it is accepted so that the call mirrors
    ``cross_entropy``). When every row is ignored (``M = 0``; ``cross_entropy`` returns NaN) the
    result is zeros and a warning is issued. Nothing of size ``k x C`` is allocated besides the
    output; sums accumulate in float32 for half types, float64 for float64.

    Not differentiable (no autograd formula is registered).

    Parameters
    ----------
    logits : Tensor
        ``(N, C)``, float64/32/16 or bfloat16; must be finite on non-ignored rows.
    target : Tensor
        ``(N,)`` int64 class indices in ``[0, C)`` or ``ignore_index``.
    directions : Tensor
        ``(k, N, C)`` (or ``(N, C)`` for one direction), float64/32/16 or bfloat16; any strides
        with unit stride along ``C`` are read in place.
    label_smoothing : float
        In ``[0, 1]``; does not change the result.
    ignore_index : int
    impl : {"auto", "fused", "composite"}
        The kernel or :func:`landscape_ext.reference.xent_hvp` (the closed form in torch ops:
        ``k x N x C`` temporaries, no argument checks); ``"auto"``: see :func:`resolve_impl`.

    Returns
    -------
    Tensor
        Same shape as ``directions``, contiguous, dtype of ``directions``.

    Shapes
    ------
    logits (N, C), target (N,), directions (k, N, C) -> (k, N, C)
    """
    if resolve_impl("xent_hvp", logits.device, impl) == "fused":
        one = directions.dim() == 2
        out = _lib.xent_hvp(logits, target, directions.unsqueeze(0) if one else directions,
                            float(label_smoothing), int(ignore_index))
        out = out[0] if one else out
    else:
        out = reference.xent_hvp(logits, target, directions, label_smoothing, ignore_index)
    # both return zeros when every row is ignored; the warning is issued here because a
    # TORCH_WARN inside a torch.ops call only reaches stderr, not Python's warnings (torch 2.13)
    if (target.numel() and not torch.compiler.is_compiling()
            and not bool((target != ignore_index).any())):
        warnings.warn(f"xent_hvp: all N = {target.numel()} targets equal ignore_index = "
                      f"{int(ignore_index)}, so the mean cross-entropy has no rows (torch's "
                      f"cross_entropy returns NaN); returning zeros", stacklevel=2)
    return out


@torch.library.register_fake("landscape_ext::xent_hvp")
def _xent_hvp_fake(logits, target, directions, label_smoothing=0.0, ignore_index=-100):
    torch._check(logits.dim() == 2 and target.dim() == 1 and directions.dim() == 3,
                 lambda: "xent_hvp: logits must be (N, C), target (N,), directions (k, N, C)")
    return directions.new_empty(directions.shape)


# ------------------------------------------------------------------------------------------------
# hvp: act_derivs
# ------------------------------------------------------------------------------------------------

#: Activation codes of :func:`act_derivs` (and of the MLP Hessian products), ``{name: code}``:
#: the table of ``csrc/hvp.h``, read from the compiled library.
ACTIVATIONS: Dict[str, int] = activation_codes()


def act_derivs(z: Tensor, act, *, impl: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    r"""A pointwise activation and its first two derivatives, in one pass over ``z``.

    ======== =================== ============================ ===============================
    act      :math:`\sigma(z)`    :math:`\sigma'(z)`           :math:`\sigma''(z)`
    ======== =================== ============================ ===============================
    identity :math:`z`            1                            0
    relu     :math:`\max(z, 0)`   :math:`[z > 0]`              0
    gelu     :math:`z\Phi(z)`     :math:`\Phi + z\varphi`      :math:`\varphi\,(2 - z^2)`
    tanh     :math:`t=\tanh z`    :math:`1 - t^2`              :math:`-2t(1 - t^2)`
    silu     :math:`z s`          :math:`s + z s(1-s)`         :math:`s(1-s)(2 + z(1 - 2s))`
    ======== =================== ============================ ===============================

    (``gelu`` is the exact erf GELU, :math:`s = \mathrm{sigmoid}(z)`). The derivative chains of
    Pearlmutter's R-forward / R-backward through an MLP. Half types compute in float32.
    Not differentiable.

    Parameters
    ----------
    z : Tensor
        Any shape; float64/32/16 or bfloat16.
    act : str or int
        A key or value of :data:`ACTIVATIONS`.
    impl : {"auto", "fused", "composite"}
        The kernel or :func:`landscape_ext.reference.act_derivs` (torch ops);
        ``"auto"``: see :func:`resolve_impl`.

    Returns
    -------
    (a, d1, d2) : tuple of Tensor
        Contiguous, shape and dtype of ``z``.
    """
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"act_derivs: unknown activation {act!r}; one of "
                             f"{sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[act]
    if resolve_impl("act_derivs", z.device, impl) == "fused":
        return _lib.act_derivs(z, int(act))
    return reference.act_derivs(z, act)


@torch.library.register_fake("landscape_ext::act_derivs")
def _act_derivs_fake(z, act):
    return z.new_empty(z.shape), z.new_empty(z.shape), z.new_empty(z.shape)
