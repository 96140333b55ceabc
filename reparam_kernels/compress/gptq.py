"""GPTQ-style calibrated quantization (Frantar et al., 2022), group-wise int4.

Minimizes the layer's output error ‖X·(W − Ŵ)ᵀ‖² on calibration inputs X
instead of the weight error. With H = XᵀX (the Gram matrix that
``compress.calib.CalibStats`` accumulates), columns of W are quantized one by
one; the rounding error of column i, divided by [H⁻¹]ᵢᵢ, is spread over the
not-yet-quantized columns with the row i of the upper Cholesky factor of H⁻¹
(optimal brain surgeon update). Updates to columns beyond the current block
of ``block_size`` columns are applied lazily, once per block, as one matmul.

Details that matter:
* Damping: H += damp · mean(diag H) · I (H from few samples is singular).
* Inputs that never fire (H_ii = 0) get H_ii = 1 and their weights zeroed
  out of the error propagation (their quantized value is irrelevant to X).
* Groups: the scale and zero point of a group are chosen from the columns
  of that group *as already updated* by the earlier compensation, when the
  quantizer reaches the group's first column. Blocks are a multiple of the
  group size, so a group never straddles a block.
* Grids (asymmetric): ``compress.quantize.asymmetric_grid`` with the same
  integer_zero / clip_steps / min_clip options as round to nearest; with
  clip_steps > 0 the clipping search weights each column's squared error by
  its input energy H_kk (``weighted_clip``), the diagonal of the output error.
Computation runs in float64 on w's device.
"""
import contextlib

import torch

from .quantize import _check_grid_args, asymmetric_grid, check_group_size


def _group_params(wg, bits, symmetric, grid, energy):
    """Scale and zero point (w ≈ (q − z)·s, q unsigned) for each group (last dim) of wg; energy = H_kk."""
    if symmetric:
        half = 2 ** (bits - 1) - 1
        s = wg.abs().amax(-1) / half
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.full_like(s, float(2 ** (bits - 1)))
    integer_zero, clip_steps, min_clip, weighted, refine_steps = grid
    return asymmetric_grid(wg, bits, integer_zero, clip_steps, min_clip, energy if weighted else None, refine_steps)


@torch.no_grad()
def gptq_quantize(w, hessian, bits=4, group_size=128, symmetric=False, damp=0.01, block_size=128,
                  act_order=False, integer_zero=True, clip_steps=0, min_clip=0.5, weighted_clip=True,
                  refine_steps=0):
    """GPTQ on ``w`` [N, K] with ``hessian`` = XᵀX [K, K].

    act_order=True quantizes the columns in order of decreasing H_ii (the inputs with the
    most energy first, while the most columns remain to absorb their error); the group
    scales and zero points are then fixed up front from the unmodified weights ("static
    groups"), so the stored format is unchanged.

    Returns (q uint8 [N, K] unsigned codes, scale [N, G] float32, zero [N, G] float32)
    with ``w ≈ (q − zero)·scale`` per group (G = K // group_size; group_size=None: per channel),
    the same format as ``quantize_linear(..., symmetric=False)`` (for symmetric=True,
    zero = 2^(bits−1)). integer_zero / clip_steps / min_clip / refine_steps choose each group's grid as in
    ``quantize_linear``; weighted_clip weights the squared error of the grid search by H_kk.
    """
    check_gptq_args(w, hessian, damp)
    n, k = w.shape
    g = check_group_size(k, group_size)
    _check_grid_args(integer_zero, clip_steps, min_clip, refine_steps)
    grid = (integer_zero, clip_steps, min_clip, bool(weighted_clip), refine_steps)
    qmax = 2 ** bits - 1
    blk = max(block_size // g, 1) * g if g < k else k
    if act_order:
        blk = block_size
    W = w.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    drop_dead_inputs(W, H)
    energy = torch.diag(H).clone()  # input energy per column, before damping (original order)
    static = None
    perm = None
    if act_order:
        # all groups in one call: a clipping search per group would be many tiny ops (slow on a busy CPU)
        static = _group_params(W.reshape(n, k // g, g), bits, symmetric, grid, energy.reshape(k // g, g))
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp)
    with single_threaded(W.device):
        if perm is None:
            return _gptq_columns(W, Hinv, n, k, g, blk, bits, qmax, symmetric, grid, energy)
        Qp = _gptq_static(W, Hinv, n, k, g, blk, qmax, static, perm)
        Q = torch.empty_like(Qp)
        Q[:, perm] = Qp
        return Q, static[0].float(), static[1].float()


def check_gptq_args(w, hessian, damp):
    """Raise ValueError unless w is a 2-D float weight [N, K], hessian [K, K] and damp in [0, 1)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("`w` must be a 2-D floating-point tensor [out_features, in_features]")
    k = w.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"`hessian` must be [K, K] = [{k}, {k}] (XᵀX of the layer inputs), got "
                         f"{tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__}")
    if not 0 <= damp < 1:
        raise ValueError(f"`damp` must be in [0, 1), got {damp}")


def drop_dead_inputs(W, H):
    """In place: inputs that never fire (H_ii = 0) get H_ii = 1 and zero weights (their value is irrelevant)."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0


def inverse_hessian_factor(H, damp):
    """The upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, whose rows spread each column's error."""
    k = H.shape[0]
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H + damp * torch.mean(torch.diag(H)) * eye)
    # H⁻¹ by cholesky_solve (torch.cholesky_inverse is ~20x slower on the CPU), then its upper factor
    return torch.linalg.cholesky(torch.cholesky_solve(eye, L), upper=True)


@contextlib.contextmanager
def single_threaded(device):
    """The column loop is thousands of tiny ops: on the CPU, intra-op threads only add sync overhead
    (measured 15x slower with 2 busy threads), so it runs single-threaded."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def propagate(W, Hinv, blk, quantize_column):
    """The GPTQ column loop over W [N, K] (modified in place), blocks of `blk` columns: column c (as updated
    by the earlier columns' errors) becomes ``quantize_column(c, W1, i)`` (W1: the current block, i: c's
    index in it), whose error, divided by Hinv_cc, is spread over the later columns by row c of Hinv."""
    k = W.shape[1]
    for i1 in range(0, k, blk):
        i2 = min(i1 + blk, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            err = (W1[:, i] - quantize_column(i1 + i, W1, i)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of the remaining columns


def _round_to_grid(Q, c, wcol, s, z, qmax):
    """Column c's codes on the grid (s, z) into Q; returns the values they stand for."""
    q = torch.clamp(torch.round(wcol / s + z), 0, qmax)
    Q[:, c] = q.to(torch.uint8)
    return (q - z) * s


def _gptq_static(W, Hinv, n, k, g, blk, qmax, static, perm):
    """Column loop in permuted order with fixed per-group scales; returns codes in permuted order."""
    scales, zeros = static
    group_of = perm // g  # permuted column -> its group in the original order
    Q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)

    def quantize_column(c, W1, i):
        gi = int(group_of[c])
        return _round_to_grid(Q, c, W1[:, i], scales[:, gi], zeros[:, gi], qmax)

    propagate(W, Hinv, blk, quantize_column)
    return Q


def _gptq_columns(W, Hinv, n, k, g, blk, bits, qmax, symmetric, grid, energy):
    Q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(n, k // g, dtype=torch.float64, device=W.device)
    zeros = torch.zeros_like(scales)

    def quantize_column(c, W1, i):
        if c % g == 0:  # a group's grid from its columns as updated so far (blocks never split a group)
            scales[:, c // g], zeros[:, c // g] = _group_params(W1[:, i:i + g], bits, symmetric, grid,
                                                                energy[c:c + g])
        return _round_to_grid(Q, c, W1[:, i], scales[:, c // g], zeros[:, c // g], qmax)

    propagate(W, Hinv, blk, quantize_column)
    return Q, scales.float(), zeros.float()
