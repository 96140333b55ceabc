"""Shared-memory bank model of the block-circulant kernels' FFT (csrc/fft_smem.cuh): the addresses
every warp's loads and stores of float2 take in each Stockham pass, re-derived from the pass's index
formulas, and the wavefronts they cost (the most distinct 4-byte words any of the 32 banks must
serve). The radix-16 passes, with the input and the values between the first two passes swizzled, must cost the minimum,
2 wavefronts (256 bytes) per warp access, at every length; the radix-4 stages they replaced did not.
The CUDA-on-CPU tests check the FFT's results; this checks its memory pattern, which they cannot see."""
import numpy as np
import pytest

THREADS, BUF = 256, 4096  # threads per CTA, complex values per buffer (the general kernel's kCap)


def swizzled(i):
    return i ^ ((i >> 4) & 15)


def wavefronts(elems):
    """Wavefronts of one warp access to float2 elements `elems` (one per active lane)."""
    words = np.unique(np.concatenate([2 * elems, 2 * elems + 1]))
    return int(np.bincount(words % 32, minlength=32).max())


def passes(H, radix16):
    """(R, ns, swz_in, swz_out) of each pass, as stockham_fft plans them (radix16=False: the old radix-4 stages)."""
    out, ns = [], 1
    while ns < H:
        R = (16 if H // ns >= 16 else H // ns) if radix16 else (4 if H // ns >= 4 else 2)
        out.append((R, ns, radix16 and ns in (1, 16), radix16 and ns == 1 and R < H))
        ns *= R
    return out


def cost(H, radix16):
    """(wavefronts, warp accesses) of one FFT of BUF // H sequences by a 256-thread CTA."""
    nseq, total, accesses = BUF // H, 0, 0
    for R, ns, swz_in, swz_out in passes(H, radix16):
        nb = H // R
        for t0 in range(0, nseq * nb, THREADS):
            for w0 in range(t0, min(t0 + THREADS, nseq * nb), 32):
                t = np.arange(w0, min(w0 + 32, nseq * nb))
                s, j = t // nb, t % nb
                k = j & (ns - 1)
                for m in range(R):
                    rd = s * H + j + m * nb
                    wr = s * H + (j - k) * R + k + m * ns
                    total += wavefronts(swizzled(rd) if swz_in else rd) + wavefronts(swizzled(wr) if swz_out else wr)
                    accesses += 2
    return total, accesses


@pytest.mark.parametrize("H", [32, 64, 128, 256, 512, 1024, 2048])
def test_radix16_passes_are_bank_conflict_free(H):
    total, accesses = cost(H, radix16=True)
    assert total == 2 * accesses, (H, total / accesses)
    old_total, _ = cost(H, radix16=False)
    assert old_total > total  # fewer passes, and the radix-4 stages' early writes conflicted


def test_the_plan_covers_each_length_once():
    for H in (32, 64, 128, 256, 512, 1024, 2048):
        assert np.prod([R for R, *_ in passes(H, True)]) == H
        assert len(passes(H, True)) == -(-int(np.log2(H)) // 4)  # ceil(log16 H) passes
