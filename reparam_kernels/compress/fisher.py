"""How much the language-model loss cares about each output channel of a Linear.

Whitened SVD makes a layer's output error small on the calibration inputs, but
an error in one output channel can cost the loss far more than the same error
in another, and one layer's error more than another's. The empirical Fisher of
the layer's outputs, F_j = E_tokens[(∂L/∂y_j)²], turns output errors into
(second-order) loss increase: ΔL ≈ ½·Σ_j F_j·‖ΔY_j‖². So

* factorizing D·W·S with D = diag(√F) (and S the input whitening) makes the
  truncation minimize the loss estimate instead of the plain output error
  (FWSVD's idea, combined with SVD-LLM's whitening), and
* the dropped singular values σ_i² of D·W·S are in loss units in *every*
  layer, so one budget can be spent across layers where it buys the most
  (``allocate.py``). Measured on SmolLM2-135M at 20% fewer parameters:
  uniform whitened 48.1 → Fisher-weighted 42.5 → Fisher + global allocation
  27.2 perplexity (dense 20.3); docs/quality.md.

``output_fisher`` costs one forward + backward pass of the whole model over the
calibration batches (no parameter gradients are formed); with ``device=`` it runs
one block at a time there (``fisher_blockwise.py``).
"""
import torch
import torch.nn.functional as F

from . import blocks

FLOOR = 1e-3  # F + FLOOR·mean(F): channels no calibration token moved still count a little
LABELS = ("text", "sampled")  # what the loss is taken against: the calibration text's next tokens, or draws
DEFAULT_LABELS = "text"       # from the model's own softmax (the true Fisher; see output_fisher)
SEED = 0                      # of the sampled labels


class _FisherHooks:
    """Accumulates (∂L/∂y_j)² over tokens into fisher[name] [out] (float64, CPU) for the modules `mods`
    {name: Linear} whenever a backward pass runs through their outputs, while active (a context)."""

    def __init__(self, mods, fisher):
        self.mods, self.fisher, self.handles = mods, fisher, []

    def __enter__(self):
        for n, m in self.mods.items():
            def fwd(_m, _args, out, _n=n):
                if out.requires_grad:
                    out.register_hook(lambda g, _n=_n: self._add(_n, g))
            self.handles.append(m.register_forward_hook(fwd))
        return self

    def _add(self, name, g):  # returns None: the gradient flows on unchanged
        self.fisher[name] += g.detach().reshape(-1, g.shape[-1]).float().pow(2).sum(0).to("cpu", torch.float64)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def sample_labels(logits, gen):
    """A next token per row of `logits` [n, vocab], drawn from its softmax: inverse CDF at uniforms drawn on the
    CPU from `gen`, so the draw is the same wherever the logits are (the blockwise pass: same labels)."""
    u = torch.rand(logits.shape[0], 1, generator=gen, dtype=torch.float64).to(logits.device)
    cdf = torch.softmax(logits.detach().float(), -1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1:].double()).to(cdf.dtype)).squeeze(1).clamp_max(logits.shape[-1] - 1)


def _sequence_loss(model, ids, gen=None):
    """Summed next-token cross entropy of the token ids [b, seq_len] (logits in float32); with `gen` (a CPU
    torch.Generator) against labels drawn from the model's own softmax instead of the text's next tokens."""
    out = model(input_ids=ids, use_cache=False)
    logits = getattr(out, "logits", out)[:, :-1].float()
    flat = logits.reshape(-1, logits.shape[-1])
    labels = ids[:, 1:].reshape(-1) if gen is None else sample_labels(flat, gen)
    return F.cross_entropy(flat, labels, reduction="sum")


def label_generator(labels):
    """The generator `_sequence_loss` draws labels with (None: the text's own next tokens)."""
    if labels not in LABELS:
        raise ValueError(f"`labels`: expected one of {LABELS}, got {labels!r}")
    return torch.Generator().manual_seed(SEED) if labels == "sampled" else None


@torch.enable_grad()
def output_fisher(model, batches, names, progress=True, device=None, labels=None):
    """{name: F [out_features] float64}: mean over calibration tokens of (∂L/∂y_j)², with L the summed
    next-token cross entropy of the token's sequence (batches: token ids [b, seq_len]).

    labels (None: DEFAULT_LABELS, read at each call, so a script may set it for every pass): "text" — L
    against the text's next tokens (the empirical Fisher); "sampled" — against tokens drawn from the
    model's softmax (seeded; the true Fisher). L sums the sequence's tokens, so the
    gradient at a block Linear's output at token t adds the losses of every later token and its square
    has cross terms; under sampled labels each token's gradient has mean zero, so they vanish in
    expectation, as in the Fisher a second-order loss estimate wants (docs/quant.md § lm_head too).

    device: where to compute when the model is elsewhere (a CPU-resident model, device="cuda"): the pass
    then runs one transformer block at a time on `device` (``fisher_blockwise.py``), same result."""
    from tqdm.auto import tqdm

    gen = label_generator(labels or DEFAULT_LABELS)
    mods = {n: model.get_submodule(n) for n in names}
    fisher = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    req = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in req:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    home = blocks.home_device(model)
    tokens = 0
    try:
        if device is not None and not blocks.same_device(device, home):
            from .fisher_blockwise import blockwise_fisher
            tokens = blockwise_fisher(model, batches, mods, fisher, device, progress, gen)
        else:
            # gradients flow from the embedding output, so no parameter needs (or gets) a .grad
            emb = model.get_input_embeddings()
            h = emb.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))
            seqs = [s for b in batches for s in b.split(1)]  # one sequence at a time: the logits' memory is the peak
            try:
                with _FisherHooks(mods, fisher):
                    for ids in tqdm(seqs, desc="fisher", unit="seq", disable=not progress, leave=False):
                        _sequence_loss(model, ids.to(home), gen).backward()
                        tokens += ids.numel()
            finally:
                h.remove()
    finally:
        for p, r in req:
            p.requires_grad_(r)
        model.train(was_training)
    if tokens == 0:
        raise ValueError("`calib`: the Fisher weighting needs calibration token ids")
    return {n: f / tokens for n, f in fisher.items()}


def channel_weights(fisher):
    """D = √(F + FLOOR·mean F): the per-output-channel weights of the Fisher-weighted SVD."""
    f = fisher.to(torch.float64)
    return (f + FLOOR * f.mean().clamp_min(1e-30)).sqrt()
