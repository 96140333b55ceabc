"""Low-rank correction of a quantized layer's error: the recipe settings ``correction_rank`` (and
``correction_iters``, ``fisher``) of the methods int8, int4, log and vq. With int4's ``mean_bits``,
``correction_rank: auto`` lets the size budget choose each layer's rank (``allocate_bits.py``).

With ``correction_rank: r`` a layer becomes ``CorrectedLinear(base, correction)``: y = Q(x) + u·v·x,
where u·v is the rank-r SVD of the residual W − Q — whitened by the layer's inputs when calibration
data is given (the output error on them, as the low-rank method's whitened SVD), weighted by the
loss's Fisher per output channel with ``fisher: true``. With ``correction_iters: k > 1`` the two parts
are refitted in turn (LoftQ's alternation): Q quantizes W − u·v, then u·v corrects W − Q again.

r·(in + out) more parameters per layer: on an [N×K] layer in fp16 that is 16·r·(N + K) / (N·K) more
bits per weight (0.25 at r = 32 on 4096²; 0.6–1.8 at r = 16 on SmolLM2's small layers).
"""
import torch

from .._linear import linear_from

CORRECTION_KEYS = ("correction_rank", "correction_iters", "fisher")


def _bad(name, msg):
    raise ValueError(f"`{name}`: {msg}")


def correction_rank(s):
    return s.get("correction_rank") or 0


def check_correction(out_f, in_f, s):
    """Raise ValueError if the correction settings do not fit an [out_f × in_f] layer."""
    r = s.get("correction_rank", 0)
    if r == "auto":
        if s.get("mean_bits") is None:
            _bad("correction_rank", "'auto' lets int4's mean_bits budget choose each layer's rank: give mean_bits")
    elif s.get("mean_bits") is not None and r:
        _bad("correction_rank", "with mean_bits give 'auto' (the budget chooses each layer's rank) or 0")
    elif isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= min(out_f, in_f):
        _bad("correction_rank", f"the rank of the low-rank correction of the quantization error, an int in "
                                f"0..{min(out_f, in_f)} for a [{out_f}×{in_f}] layer (0: none) or 'auto' with "
                                f"mean_bits; got {r!r}")
    k = s.get("correction_iters", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        _bad("correction_iters", f"rounds of quantize-then-correct, an int >= 1; got {k!r}")
    if not r and ("correction_iters" in s or s.get("fisher")):
        _bad("correction_rank", "correction_iters and fisher set the low-rank correction: give correction_rank > 0")


def correction_needs_calib(s):
    """fisher=true weights the correction by the loss, measured on the calibration data."""
    return bool(correction_rank(s) and s.get("fisher"))


def _shifted(linear, shift):
    """An nn.Linear like `linear` whose weight is W − shift (what the base quantizes in later rounds)."""
    w = linear.weight.detach()
    return linear_from((w.float() - shift.to(w.device, torch.float32)).to(w.dtype), linear.bias)


def with_correction(build):
    """A method's build function, extended with the correction settings (unchanged when correction_rank is 0)."""
    def build_corrected(linear, s, stats):
        r = correction_rank(s)
        if not r:
            return build(linear, s, stats)
        from ..nn.corrected import CorrectedLinear

        calib = stats if stats is not None and getattr(stats, "count", 0) > 0 else None
        out_weight = getattr(stats, "out_weight", None) if s.get("fisher") else None
        if s.get("fisher") and out_weight is None:
            _bad("fisher", "no Fisher weights for this layer (compress() computes them from the calibration data)")
        layer = None
        for _ in range(s.get("correction_iters", 1)):
            target = linear if layer is None else _shifted(linear, layer.correction.to_dense().detach())
            layer = CorrectedLinear.from_linear(linear, build(target, s, stats), r, calib=calib, out_weight=out_weight)
        return layer
    return build_corrected
