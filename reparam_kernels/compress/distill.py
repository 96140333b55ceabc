"""Knowledge distillation of a compressed student from its dense teacher.

loss = α·L_task + (1 − α)·T²·KL(p_teacher^T ‖ p_student^T)
       [+ β·hidden-state loss on chosen layers]

* L_task: next-token cross entropy on the data;
* KL at temperature T over every position (``reverse_kl=True`` uses
  KL(p_student ‖ p_teacher) instead: mode-seeking);
* hidden-state matching: MSE or 1 − cosine between student and teacher
  hidden states of the layers in ``hidden_layers`` (indices into the
  model's ``hidden_states`` output), weighted by ``hidden_weight``.

Only the parameters of the compressed layers (modules that ``compress``
marked, e.g. low-rank factors, structured spectra) are trained; everything
else is frozen. Gradient accumulation: ``batch_size`` sequences per micro
step, ``grad_accum`` micro steps per optimizer step.
"""
import math
import time

import torch
import torch.nn.functional as F

from .blocks import check_token_ids


def compressed_parameters(model):
    """Trainable parameters of the layers `compress` replaced (marked with `_reparam_method`)."""
    params, seen = [], set()
    for mod in model.modules():
        if getattr(mod, "_reparam_method", None) not in (None, "skip"):
            for p in mod.parameters():
                if p.is_floating_point() and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def _kl(student_logits, teacher_logits, temperature, reverse):
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if reverse:  # KL(p_s ‖ p_t)
        return (s.exp() * (s - t)).sum(-1).mean()
    return (t.exp() * (t - s)).sum(-1).mean()  # KL(p_t ‖ p_s)


def _hidden_loss(hs, ht, kind):
    if kind == "mse":
        return F.mse_loss(hs.float(), ht.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(hs.float(), ht.float(), dim=-1)).mean()
    raise ValueError(f"`hidden_loss` must be 'mse' or 'cosine', got {kind!r}")


def _check(alpha, temperature, steps, lr, batch_size, grad_accum, data, amp_dtype):
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}")
    if amp_dtype not in (None, torch.bfloat16):  # fp16 would need loss scaling, which distill does not do
        raise ValueError(f"`amp_dtype` must be None or torch.bfloat16, got {amp_dtype!r}")
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`data` must be token ids [n, seq_len] (int64), got "
                         f"{getattr(data, 'dtype', type(data))} {tuple(getattr(data, 'shape', ()))}")


def distill(student, teacher, data, alpha=0.0, temperature=2.0, steps=200, lr=1e-4, batch_size=1, grad_accum=1,
            reverse_kl=False, hidden_layers=None, hidden_loss="mse", hidden_weight=1.0, params=None,
            weight_decay=0.0, seed=0, progress=True, log_every=10, amp_dtype=None,
            on_step=None):
    """Train `student`'s compressed parameters to match `teacher`; returns a history dict.

    data: token ids [n, seq_len]; each micro step takes `batch_size` sequences (cycling).
    params: the parameters to train (default: ``compressed_parameters(student)``).
    CPU-sized mode: a few hundred steps of batch 1 × 128–256 tokens on SmolLM2-135M;
    GPU mode: larger batch_size / seq_len with the same call.
    amp_dtype: e.g. torch.bfloat16 runs teacher and student forward/backward under torch.autocast
    (parameters and optimizer state stay fp32); on a CPU with AVX512-BF16 this about halves the step time.
    on_step: called as on_step(step) after each optimizer step (e.g. to evaluate a checkpoint; the student
    is put back in train mode after it returns).
    Pivoted low-rank layers (nn.PivotedLowRankLinear) are trained as balanced plain factors — the same
    weight, swapped in place for the run — and stored pivoted again at the end (both conversions exact).
    """
    _check(alpha, temperature, steps, lr, batch_size, grad_accum, data, amp_dtype)
    check_token_ids(student, [data], "data")
    from ..nn.pivoted import PivotedLowRankLinear, swap_layers, to_balanced_lowrank, to_pivoted

    pivoted = []
    if params is None:  # pivoted low-rank layers train as balanced plain factors, re-pivoted at the end
        pivoted = [n for n, m in student.named_modules() if isinstance(m, PivotedLowRankLinear)]
        swap_layers(student, pivoted, to_balanced_lowrank)
    try:
        return _distill(student, teacher, data, alpha, temperature, steps, lr, batch_size, grad_accum, reverse_kl,
                        hidden_layers, hidden_loss, hidden_weight, params, weight_decay, seed, progress, log_every,
                        amp_dtype, on_step)
    finally:
        swap_layers(student, pivoted, to_pivoted)  # exact: the trained product stored pivoted again


def _distill(student, teacher, data, alpha, temperature, steps, lr, batch_size, grad_accum, reverse_kl, hidden_layers,
             hidden_loss, hidden_weight, params, weight_decay, seed, progress, log_every, amp_dtype, on_step):
    from tqdm.auto import tqdm

    params = compressed_parameters(student) if params is None else list(params)
    if not params:
        raise ValueError("`student` has no compressed parameters to train (compress it first, or pass `params`)")
    train_ids = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(id(p) in train_ids)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    dev = next(student.parameters()).device
    want_hidden = bool(hidden_layers)
    history = {"step": [], "loss": [], "kl": [], "task": [], "hidden": [], "seconds": 0.0}
    t0, cursor = time.perf_counter(), 0
    bar = tqdm(range(steps), desc="distill", disable=not progress)
    try:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            acc = {"loss": 0.0, "kl": 0.0, "task": 0.0, "hidden": 0.0}
            for _ in range(grad_accum):
                idx = order[torch.arange(cursor, cursor + batch_size) % data.shape[0]]
                cursor += batch_size
                ids = data[idx].to(dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
                    with torch.no_grad():
                        tout = teacher(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
                    sout = student(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
                sl, tl = sout.logits[:, :-1].float(), tout.logits[:, :-1].float()
                kl = _kl(sl, tl, temperature, reverse_kl) * temperature ** 2
                task = F.cross_entropy(sl.reshape(-1, sl.shape[-1]), ids[:, 1:].reshape(-1)) if alpha > 0 else sl.new_zeros(())
                hid = sl.new_zeros(())
                if want_hidden:
                    hid = sum(_hidden_loss(sout.hidden_states[i], tout.hidden_states[i], hidden_loss)
                              for i in hidden_layers) / len(hidden_layers)
                loss = alpha * task + (1 - alpha) * kl + hidden_weight * hid
                (loss / grad_accum).backward()
                for k, v in (("loss", loss), ("kl", kl), ("task", task), ("hidden", hid)):
                    acc[k] += float(v.detach()) / grad_accum
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps - 1:
                history["step"].append(step)
                for k in acc:
                    history[k].append(acc[k])
            bar.set_postfix(loss=f"{acc['loss']:.4f}", kl=f"{acc['kl']:.4f}")
            if on_step is not None:
                on_step(step)
                student.train()
    finally:
        bar.close()
        for p, req in frozen:
            p.requires_grad_(req)
        student.eval()
    history["seconds"] = time.perf_counter() - t0
    return history
