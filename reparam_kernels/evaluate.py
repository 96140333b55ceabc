"""Perplexity of a causal LM on a text, over windows of tokens.

The text is tokenized once (no BOS) and cut into consecutive, non-overlapping
windows of `window` tokens starting at the beginning; the first `max_windows`
windows are scored (all full windows when None). Perplexity = exp(mean
next-token cross entropy over every predicted token of those windows).
"""
import math

import torch
import torch.nn.functional as F


def token_windows(tokenizer, text, window=1024, max_windows=None):
    """LongTensor [n_windows, window] of consecutive token windows of `text`."""
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"`window` must be an int >= 2, got {window!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"`max_windows` must be a positive int or None, got {max_windows!r}")
    # tokenize only as much text as needed (about 4 characters per token; ×2 margin)
    chars = len(text) if max_windows is None else min(len(text), 8 * window * max_windows + 1000)
    ids = tokenizer(text[:chars], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"`text` has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, tokenizer=None, text=None, window=1024, max_windows=None, batch_size=1,
               windows=None, progress=True, desc="perplexity"):
    """exp(mean next-token NLL). Give `tokenizer` + `text`, or ready `windows` [n, window]."""
    from tqdm.auto import tqdm

    if windows is None:
        if tokenizer is None or text is None:
            raise ValueError("`text`: give `tokenizer` and `text`, or `windows`")
        windows = token_windows(tokenizer, text, window, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False)
    for i in bar:
        ids = windows[i: i + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
