"""distill(), save_compressed / load_compressed, and the CLI on a tiny Llama."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress import distill, load_compressed, save_compressed  # noqa: E402
from reparam_kernels.compress.distill import compressed_parameters  # noqa: E402
from reparam_kernels.nn import LowRankLinear  # noqa: E402

CFG = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def tiny_llama(seed=0, init=0.2):
    # a larger init than the default 0.02 gives peaked, non-trivial output distributions to distill
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG, initializer_range=init)).eval()


def _ids(n, length=20, seed=1):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


RECIPE = {"model.layers.*.mlp.*_proj": {"method": "lowrank", "ratio": 0.5},
          "model.layers.*.self_attn.q_proj": {"method": "lowrank", "rank": 12, "whiten": False}}


def _kl_to_teacher(student, teacher, ids):
    with torch.no_grad():
        s = torch.log_softmax(student(ids).logits, -1)
        t = torch.log_softmax(teacher(ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("opts", [dict(), dict(reverse_kl=True, grad_accum=2),
                                  dict(hidden_layers=[1, 2], hidden_loss="cosine", hidden_weight=0.5),
                                  dict(amp_dtype=torch.bfloat16)])
def test_distill_reduces_kl_and_trains_only_compressed_parameters(opts):
    teacher = tiny_llama()
    student, _ = rk.compress(teacher, RECIPE, calib=_ids(8), progress=False)
    frozen_before = {n: p.clone() for n, p in student.named_parameters()
                     if not any(n.endswith(s) for s in (".u", ".v")) and "mlp" not in n and "q_proj" not in n}
    held = _ids(4, seed=9)
    before = _kl_to_teacher(student, teacher, held)
    hist = distill(student, teacher, _ids(16, seed=2), temperature=1.0, steps=30, lr=3e-3, batch_size=4,
                   progress=False, **opts)
    after = _kl_to_teacher(student, teacher, held)
    print("held-out KL", before, "->", after, opts)
    assert after < before
    assert hist["loss"][-1] < hist["loss"][0]
    for n, p in student.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert len(compressed_parameters(student)) == 2 * 3 * 2 + 2 * 2  # u, v of 3 MLP + q per block (+ no bias)


def test_distill_on_step_sees_every_step_and_student_trains_after():
    teacher = tiny_llama()
    student, _ = rk.compress(teacher, RECIPE, calib=_ids(8), progress=False)
    seen = []

    def on_step(step):
        seen.append((step, student.training))
        student.eval()  # e.g. an evaluation; distill must put the student back in train mode

    distill(student, teacher, _ids(8, seed=2), steps=4, lr=1e-3, batch_size=2, progress=False, on_step=on_step)
    assert seen == [(0, True), (1, True), (2, True), (3, True)]


def test_distill_task_loss_only():
    teacher = tiny_llama()
    student, _ = rk.compress(teacher, RECIPE, calib=_ids(8), progress=False)
    data = _ids(1, seed=3).repeat(8, 1)  # one sequence: the task loss must fall when trained on it
    hist = distill(student, teacher, data, alpha=1.0, steps=20, lr=1e-2, batch_size=2, progress=False, log_every=1)
    assert hist["task"][-1] < 0.8 * hist["task"][0]


def test_distill_bad_arguments():
    t = tiny_llama()
    with pytest.raises(ValueError, match="`alpha`"):
        distill(t, t, _ids(2), alpha=1.5, steps=1)
    with pytest.raises(ValueError, match="`data`"):
        distill(t, t, torch.randn(2, 5), steps=1)
    with pytest.raises(ValueError, match=r"`data`: token ids must lie in \[0, 101\)"):
        distill(t, t, _ids(2) + 101, steps=1)
    with pytest.raises(ValueError, match="`amp_dtype`"):
        distill(t, t, _ids(2), steps=1, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="no compressed parameters"):
        distill(t, t, _ids(2), steps=1, progress=False)


def _compressed():
    teacher = tiny_llama()
    recipe = dict(RECIPE)
    recipe["model.layers.1.self_attn.k_proj"] = {"method": "int8"}
    student, _ = rk.compress(teacher, recipe, calib=_ids(8), progress=False)
    return student


def test_save_load_bit_identical(tmp_path):
    student = _compressed()
    ids = _ids(3, seed=5)
    with torch.no_grad():
        ref = student(ids).logits
    out = save_compressed(student, tmp_path / "ck")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["class"] == "LowRankLinear"
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["torch"] == torch.__version__ and manifest["recipe"]
    skeleton = tiny_llama(seed=123)
    load_compressed(skeleton, out)
    assert isinstance(skeleton.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, ref)
    assert skeleton.lm_head.weight.data_ptr() == skeleton.model.embed_tokens.weight.data_ptr()
    # re-saving over an existing checkpoint replaces it atomically
    save_compressed(skeleton, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _unchanged(model, snapshot):
    return all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items()) and \
        isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_load_errors_change_nothing(tmp_path):
    out = save_compressed(_compressed(), tmp_path / "ck")
    skel = tiny_llama(seed=4)
    snap = {k: v.clone() for k, v in skel.state_dict().items()}
    # corrupted tensors file
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(bytes(data))
    (bad / "manifest.json").write_text((out / "manifest.json").read_text())
    with pytest.raises(ValueError, match="sha256"):
        load_compressed(skel, bad)
    assert _unchanged(skel, snap)
    # missing tensor: the file lacks one factor (manifest hash updated so only the content check can catch it)
    from safetensors.torch import load_file, save_file
    from reparam_kernels.compress.serialize import _sha256
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.v"]
    save_file(tensors, str(bad / "model.safetensors"))
    m = json.loads((out / "manifest.json").read_text())
    m["sha256"] = _sha256(bad / "model.safetensors")
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="missing tensors.*down_proj.v"):
        load_compressed(skel, bad)
    assert _unchanged(skel, snap)
    # mismatched skeleton (different widths)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CFG, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="mismatch|skeleton"):
        load_compressed(other, out)
    assert isinstance(other.model.layers[0].mlp.up_proj, nn.Linear)
    # not a checkpoint
    with pytest.raises(ValueError, match="not a compressed checkpoint"):
        load_compressed(skel, tmp_path)
    # a save that fails leaves no checkpoint behind
    def fail(_tmp):
        raise RuntimeError("disk full")
    student = _compressed()
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(student, tmp_path / "never", extra=fail)
    assert not (tmp_path / "never").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    # … and a failed re-save keeps the old checkpoint intact
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(student, out, extra=fail)
    assert (out / "model.safetensors").read_bytes() == before


def test_cli_compress_and_eval(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token="</s>")
    tok.save_pretrained(tmp_path / "dense")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - match: 'model.layers.*.mlp.*_proj'\n    method: lowrank\n    ratio: 0.3\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(rk.__file__)))  # the package under test, not another install
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "reparam_kernels", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=str(tmp_path), env=env)
    r = run("compress", "--model", str(tmp_path / "dense"), "--recipe", str(recipe), "--calib", str(text),
            "--calib-seqs", "4", "--calib-len", "32", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "total (6 layers)" in r.stdout
    r = run("eval", "--model", str(tmp_path / "c"), "--text", str(text), "--window", "64", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    ppl = json.loads(r.stdout.strip().splitlines()[-1])["perplexity"]
    assert 1 < ppl < 1e4
    # --calib random: calibration statistics from random token ids (here the whitening of the same recipe,
    # which random tokens mislead: the CLI says so, as compress(calib="random") does)
    r = run("compress", "--model", str(tmp_path / "dense"), "--recipe", str(recipe), "--calib", "random",
            "--calib-seqs", "4", "--calib-len", "32", "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "total (6 layers)" in r.stdout
    assert "calib='random': rule(s) 'model.layers.*.mlp.*_proj'" in r.stderr
    assert "note: without --calib" not in r.stdout
    # a quantizer whose grid calibration would weight, run without --calib: the CLI says what --calib random gives
    log = tmp_path / "log.yaml"
    log.write_text("rules:\n  - match: 'model.layers.*.mlp.*_proj'\n    method: log\n")
    r = run("compress", "--model", str(tmp_path / "dense"), "--recipe", str(log), "--out", str(tmp_path / "l"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: without --calib the int4 / log / vq grids are not weighted" in r.stdout


def test_cli_compress_dry_run_and_clear_errors(tmp_path, capsys):
    from reparam_kernels.__main__ import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token="</s>").save_pretrained(tmp_path / "dense")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - match: 'model.layers.*.mlp.*_proj'\n    method: int8\n"
                      "  - match: 'model.layers.0.self_attn.q_proj'\n    method: lowrank\n    rank: 4\n    whiten: false\n")
    assert main(["compress", "--model", str(tmp_path / "dense"), "--recipe", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    mlp = sum(m.weight.numel() for n, m in model.named_modules() if ".mlp." in n and isinstance(m, nn.Linear))
    assert f"| `model.layers.*.mlp.*_proj` | int8 | - | 6 | {mlp:,} |" in out
    assert "| lowrank | rank=4, whiten=False | 1 |" in out
    assert "7 of 15 Linears would be compressed" in out and not (tmp_path / "c").exists()
    # a recipe that needs calibration data, without it: the message, exit 2, no traceback
    assert main(["compress", "--model", str(tmp_path / "dense"), "--recipe", "default", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "compress: error: `calib`: method 'lowrank'" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # neither --out nor --dry-run
        main(["compress", "--model", str(tmp_path / "dense")])


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(90)}
    vocab.update({"</s>": 90, "<unk>": 91})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


def test_tensorized_layers_through_compress_and_save(tmp_path):
    pytest.importorskip("reparam_kernels.nn.tensorized")
    teacher = tiny_llama()
    recipe = {"model.layers.0.mlp.up_proj": {"method": "cp", "rank": 8, "out_modes": [80], "in_modes": [6, 8]},
              "model.layers.1.mlp.up_proj": {"method": "tucker", "ranks": [40, 6, 8],
                                             "out_modes": [80], "in_modes": [6, 8]}}
    student, rep = rk.compress(teacher, recipe, calib=_ids(4), progress=False)
    assert [type(student.model.layers[i].mlp.up_proj).__name__ for i in (0, 1)] == ["CPLinear", "TuckerLinear"]
    assert all(0 < l.weight_error < 1 for l in rep.layers)
    ids = _ids(2, seed=6)
    with torch.no_grad():
        ref = student(ids).logits
    save_compressed(student, tmp_path / "t")
    skel = tiny_llama(seed=77)
    load_compressed(skel, tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(skel(ids).logits, ref)


def test_distill_trains_pivoted_layers_as_balanced_factors():
    """distill() swaps each PivotedLowRankLinear for the balanced LowRankLinear of the same weight, trains,
    and stores the result pivoted again: exactly what training that balanced layer by hand gives."""
    from reparam_kernels.nn import PivotedLowRankLinear
    from reparam_kernels.nn.pivoted import swap_layers, to_balanced_lowrank

    teacher = tiny_llama()
    recipe = {"model.layers.*.mlp.*_proj": {"method": "lowrank", "ratio": 0.5, "pivoted": True}}
    student, _ = rk.compress(teacher, recipe, calib=_ids(8), progress=False)
    names = [n for n, m in student.named_modules() if isinstance(m, PivotedLowRankLinear)]
    assert len(names) == 6
    by_hand = copy_model(student)
    swap_layers(by_hand, names, to_balanced_lowrank)
    held = _ids(4, seed=9)
    before = _kl_to_teacher(student, teacher, held)
    kw = dict(temperature=1.0, steps=20, lr=3e-3, batch_size=4, progress=False)
    distill(student, teacher, _ids(16, seed=2), **kw)
    distill(by_hand, teacher, _ids(16, seed=2), **kw)
    assert all(isinstance(student.get_submodule(n), PivotedLowRankLinear) for n in names)
    assert all(getattr(student.get_submodule(n), "_reparam_method", None) == "lowrank" for n in names)
    after = _kl_to_teacher(student, teacher, held)
    assert after < before
    with torch.no_grad():
        a, b = student(held).logits, by_hand(held).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def copy_model(m):
    import copy

    return copy.deepcopy(m)
