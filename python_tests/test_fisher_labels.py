"""The Fisher's labels (compress/fisher.py): "sampled" estimates the true Fisher E_y~model[(∂L/∂y_j)²], checked
against it computed exactly by enumerating every label of a tiny vocabulary."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from reparam_kernels.compress import blocks  # noqa: E402
from reparam_kernels.compress.fisher import output_fisher, sample_labels  # noqa: E402

from test_compress_pipeline import _ids, tiny_llama  # noqa: E402

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj", "lm_head"]


def exact_true_fisher(model, ids, names):
    """Σ_s Σ_t E_{y_t~p_t}[(∂ℓ_t(y_t)/∂o_s)²] per output channel of each Linear (o_s: its output at token s).
    The summed loss's cross terms between tokens vanish in expectation (E_y ∂ℓ_t/∂o = 0), and
    Σ_y p_y (e_y − p)(e_y − p)ᵀ = Cov: one backward per label position t over a batch of one copy of the
    sequence per vocabulary entry y, whose logits at t get the gradient √p_y·(p − e_y)."""
    vocab = model.config.vocab_size
    out = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    batch = ids.expand(vocab, -1)
    for t in range(ids.shape[1] - 1):
        acts = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o))
                 for n in names]
        with torch.enable_grad():
            logits = model(input_ids=batch, use_cache=False).logits.double()
        for h in hooks:
            h.remove()
        p = torch.softmax(logits[0, t].detach(), -1)
        g = torch.zeros_like(logits)
        g[:, t] = p.sqrt()[:, None] * (p[None, :] - torch.eye(vocab, dtype=p.dtype))
        grads = torch.autograd.grad(logits, [acts[n] for n in names], g)
        for n, gr in zip(names, grads):
            out[n] += gr.double().pow(2).sum((0, 1))
    return out


def test_sampled_labels_estimate_the_true_fisher():
    model = tiny_llama(seed=3)
    ids = _ids(1, 8, seed=4)
    want = exact_true_fisher(model, ids, NAMES)
    copies = 256
    got = output_fisher(model, list(ids.expand(copies, -1).split(32)), NAMES, progress=False, labels="sampled")
    text = output_fisher(model, [ids], NAMES, progress=False, labels="text")
    for n in NAMES:
        w = want[n] / ids.numel()
        total = float((got[n].sum() / w.sum() - 1).abs())
        channel = float((got[n] / w - 1).abs().median())
        assert total < 0.05, (n, total)  # 256 × 7 label draws (measured: ≤ 0.018)
        assert channel < 0.25, (n, channel)  # lm_head's channels see rare labels (measured: 0.02, 0.04, 0.16)
        assert float((text[n] / w - 1).abs().median()) > 2 * channel  # the text's labels: 0.4–1.0


def test_sample_labels_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, -1)
    labels = sample_labels(logits, torch.Generator().manual_seed(1))
    freq = torch.bincount(labels, minlength=4).double() / labels.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), atol=0.012, rtol=0)


def test_sampled_labels_are_the_same_block_by_block(monkeypatch):
    model = tiny_llama(seed=3, layers=3, hidden=64, ffn=96)
    batches = list(_ids(5, 16, seed=4).split(2))
    whole = output_fisher(model, batches, NAMES, progress=False, labels="sampled")
    monkeypatch.setattr(blocks, "same_device", lambda a, b: False)
    blockwise = output_fisher(model, batches, NAMES, progress=False, device="cpu", labels="sampled")
    for n in NAMES:
        torch.testing.assert_close(blockwise[n], whole[n], rtol=1e-5, atol=1e-6 * float(whole[n].abs().max()))


def test_labels_are_validated():
    with pytest.raises(ValueError, match="`labels`"):
        output_fisher(tiny_llama(), [_ids(1, 8)], NAMES[:1], progress=False, labels="teacher")
