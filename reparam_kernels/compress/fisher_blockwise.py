"""The Fisher pass of ``fisher.py`` one transformer block at a time, for a model kept off the accelerator.

``compress(model, ..., device="cuda")`` with the model in CPU memory moves one block at a time to the
GPU. The Fisher of the Linears' outputs needs a backward pass through the whole model, which would
otherwise run where the model is (on the CPU: hours for an 8B model). Here the pass is cut at the block
boundaries, as gradient checkpointing cuts it:

1. forward, block by block on `device`: each block's input hidden states are kept (where the model is),
   one [b, seq_len, hidden] tensor per calibration batch and block;
2. the head: the model with its blocks swapped for stand-ins runs on `device` (embedding, final norm,
   lm_head: the blocks' weights stay behind); the last stand-in returns the last block's kept output
   as a leaf that requires grad, so the loss's backward stops there and leaves ∂L/∂(last output);
   one sequence at a time (the logits are the peak, as in the whole-model pass);
3. backward, last block first: each block runs again on its kept input with grad enabled and
   backpropagates the gradient at its output — its Linears' Fisher hooks see the same ∂L/∂y a
   whole-model backward gives them — and the gradient at its input goes on to the block before.

On the device at once: one block (or the head), one batch's activations. Same result as the
whole-model pass up to float rounding (``test_fisher_allocation.py``).
"""
import contextlib

import torch
from torch import nn

from .blocks import (_first_tensor, _with_hidden, block_inputs, find_blocks, hidden_of, home_device, move, on_device,
                     run_block)


class _StandIn(nn.Module):
    """Block i during the head pass: hands its input hidden state on, or returns `value` (set on the
    last one), shaped as the real block's output (a tensor, or a tuple led by the hidden state). Other
    attributes are the real block's (some models' loops read e.g. `decoder_layer.attention_type`); the
    block is held outside the module tree, so its weights do not move with the model."""

    def __init__(self, block, astuple):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.astuple, self.value = astuple, None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._block, name)

    def forward(self, *args, **kwargs):
        h = self.value if self.value is not None else hidden_of(args, kwargs)
        return (h,) if self.astuple else h


def _forward(blocks, inputs, device):
    """[(args, kwargs) block i received per batch, for each block], the last block's outputs (as the
    next inputs), and whether the blocks return tuples; hidden states kept on the inputs' device."""
    kept, astuple = [], False
    for block in blocks:
        kept.append(inputs)
        with on_device(block, device):
            outs, astuple = run_block(block, move(inputs, device))
        inputs = [_with_hidden(a, k, hidden_of(*o).to(hidden_of(a, k).device)) for (a, k), o in zip(inputs, outs)]
    return kept, inputs, astuple


@contextlib.contextmanager
def head_only(model, blocks, astuple, device):
    """The model without its blocks' weights, on `device`, for the body of the with: every block is a
    stand-in that hands its input on, and the last one's `value` (set it) becomes the blocks' output.
    Yields that last stand-in; the blocks and the model's device are restored after."""
    home = home_device(model)
    originals = list(blocks)
    stand = [_StandIn(b, astuple) for b in originals]
    try:
        for i, s in enumerate(stand):
            blocks[i] = s
        model.to(device)  # embedding, final norm, lm_head: the blocks are not in the model now
        yield stand[-1]
    finally:
        stand[-1].value = None
        model.to(home)
        for i, b in enumerate(originals):
            blocks[i] = b


def _head_grads(model, blocks, last_outputs, batches, astuple, hooks, device, bar, gen):
    """∂L/∂(last block's output) per batch (kept where the outputs are), the head on `device`; returns
    (grads, tokens)."""
    from .fisher import _sequence_loss

    grads, tokens = [], 0
    with head_only(model, blocks, astuple, device) as last, hooks:
        for (a, k), ids in zip(last_outputs, batches):
            h_last = hidden_of(a, k)
            g = torch.empty_like(h_last)
            for s in range(ids.shape[0]):
                last.value = h_last[s:s + 1].to(device).requires_grad_(True)
                _sequence_loss(model, ids[s:s + 1].to(device), gen).backward()
                g[s:s + 1] = last.value.grad.to(g.device)
                tokens += ids[s].numel()
                bar.update(1)
            grads.append(g)
    return grads, tokens


def blockwise_fisher(model, batches, mods, fisher, device, progress=True, gen=None):
    """Adds Σ_tokens (∂L/∂y_j)² into fisher[name] for the Linears `mods` {name: module} (inside the blocks
    or after them, e.g. lm_head), running one block at a time on `device`; returns the tokens counted.
    gen: draws the labels (fisher.label_generator), sequence by sequence in the whole-model pass's order."""
    from tqdm.auto import tqdm

    from .fisher import _FisherHooks

    prefix, blocks = find_blocks(model, [n for n, _ in model.named_modules()])
    if not blocks:
        raise ValueError("output_fisher(device=...): the model has no list of transformer blocks to run one at a "
                         "time; move the model to the device instead")
    inside = {n: m for n, m in mods.items() if n.startswith(prefix + ".")}
    outside = {n: m for n, m in mods.items() if n not in inside}
    lowest = min((int(n[len(prefix) + 1:].split(".", 1)[0]) for n in inside), default=len(blocks))
    seqs = sum(b.shape[0] for b in batches)
    bar = tqdm(total=2 * len(blocks) - lowest + seqs, desc="fisher (block by block)", unit="step",
               disable=not progress, leave=False)
    try:
        inputs = block_inputs(model, blocks[0], batches)
        kept, last, astuple = _forward(blocks, inputs, device)
        bar.update(len(blocks))
        grads, tokens = _head_grads(model, blocks, last, batches, astuple, _FisherHooks(outside, fisher), device, bar,
                                    gen)
        for i in range(len(blocks) - 1, lowest - 1, -1):
            local = {n: m for n, m in inside.items() if n.startswith(f"{prefix}.{i}.")}
            new = []
            with on_device(blocks[i], device), _FisherHooks(local, fisher):
                for (a, k), g in zip(kept[i], grads):
                    h = hidden_of(a, k).to(device).requires_grad_(True)
                    a2, k2 = _with_hidden(*move(_with_hidden(a, k, None), device), h)  # h: not copied twice
                    _first_tensor(blocks[i](*a2, **k2)).backward(g.to(device))
                    if i > lowest:
                        new.append(h.grad.to(g.device))
            grads, kept[i] = new, None
            bar.update(1)
    finally:
        bar.close()
    return tokens
