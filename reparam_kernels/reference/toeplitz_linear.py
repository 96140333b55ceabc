from .block_circulant_linear import block_circulant_linear


def toeplitz_linear(x, t_spectrum, fft_size, out_features, bias=None):
    """y = T x + bias for a Toeplitz T [N, K], through its L×L circulant embedding (L = fft_size).

    The embedding's first column holds the lower diagonals at the top and the
    upper ones at the bottom (compress/structured.toeplitz_embedding_column), so
    the top-left N×K block of the circulant is T: pad x to L, multiply, keep N outputs.
    This is exactly a block-circulant product with one L×L block.
    """
    return block_circulant_linear(x, t_spectrum, fft_size, out_features, bias)
