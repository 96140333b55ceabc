"""Distill a compressed checkpoint from its dense teacher on a text, and save it.

    python -m reparam_kernels distill --student DIR --teacher <HF folder | .gguf | smollm2> \
        --text <file | austen:persuasion> --out DIR2 [--steps 200 --seq-len 128 --lr 1e-4 --alpha 0 --temperature 2 --bf16]
"""
import argparse

from ._help import MODEL_HELP, TEXT_HELP


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m reparam_kernels distill", description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="the compressed model to train: " + MODEL_HELP)
    ap.add_argument("--teacher", required=True, help="the dense model it learns from: " + MODEL_HELP)
    ap.add_argument("--text", required=True, help="training text: " + TEXT_HELP)
    ap.add_argument("--out", required=True, help="folder to write the trained checkpoint to")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens a training sequence (default 128)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences a micro step (default 1)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro steps an optimizer step (default 1)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, cosine decay (default 1e-4)")
    ap.add_argument("--alpha", type=float, default=0.0, help="loss = alpha·next-token loss + (1 - alpha)·T²·KL to the teacher (default 0: KL only)")
    ap.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL (default 2)")
    ap.add_argument("--reverse-kl", action="store_true", help="KL(student || teacher) instead of KL(teacher || student)")
    ap.add_argument("--bf16", action="store_true", help="run forward/backward under bf16 autocast (fp32 parameters)")
    args = ap.parse_args(argv)

    import torch

    from ..compress import distill
    from ..compress.serialize import save_compressed
    from ..evaluate import token_windows
    from ._models import load_any, read_text

    student, tok = load_any(args.student)
    teacher, _ = load_any(args.teacher)
    n = args.steps * args.batch_size * args.grad_accum
    data = token_windows(tok, read_text(args.text), args.seq_len, n)
    hist = distill(student, teacher, data, alpha=args.alpha, temperature=args.temperature, steps=args.steps,
                   lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, reverse_kl=args.reverse_kl,
                   amp_dtype=torch.bfloat16 if args.bf16 else None)
    print(f"distilled {args.steps} steps in {hist['seconds']:.0f} s; loss {hist['loss'][0]:.4f} → {hist['loss'][-1]:.4f}")
    save_compressed(student, args.out, tokenizer=tok)
    print(f"saved to {args.out}")
    return 0
