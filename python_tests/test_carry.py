"""tools/carry.py (the extension's trip to the GPU machine) and benchmarks/gpu_session.sh's fixed inputs: a
mistake in either would cost a GPU session, which CI cannot give back, so both are checked here."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("carry", os.path.join(ROOT, "tools", "carry.py"))
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)


def fake_tree(tmp_path, payload):
    root = tmp_path / "tree"
    (root / "reparam_kernels").mkdir(parents=True)
    (root / "csrc").mkdir()
    (root / "csrc" / "op.cu").write_text("// a kernel\n")
    so = root / "reparam_kernels" / "_C.abi3.so"
    so.write_bytes(payload)
    os.utime(so, (os.path.getmtime(root / "csrc" / "op.cu") + 10,) * 2)  # built after its sources
    return root, so


def test_pack_unpack_round_trip(tmp_path):
    payload = os.urandom(1 << 16) + bytes(1 << 18)  # (a compressible tail, as an extension's is)
    root, so = fake_tree(tmp_path, payload)
    dest = tmp_path / "carry"
    manifest = carry.pack(str(root), str(dest), strip=False)
    packed = dest / carry.PACKED
    assert packed.stat().st_size < len(payload) / 2
    assert manifest["extension"]["sha256"] == carry.sha256(str(so))
    assert json.loads((dest / carry.MANIFEST).read_text()) == manifest
    so.unlink()
    carry.unpack(str(root), str(dest))
    assert so.read_bytes() == payload and os.access(so, os.X_OK)
    assert not os.path.exists(str(so) + ".part")


def test_damaged_copy_replaces_nothing(tmp_path):
    root, so = fake_tree(tmp_path, os.urandom(1 << 15))
    dest = tmp_path / "carry"
    carry.pack(str(root), str(dest), strip=False)
    packed = dest / carry.PACKED
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    so.write_bytes(b"the tree's own build")
    with pytest.raises(SystemExit, match="damaged"):
        carry.unpack(str(root), str(dest))
    assert so.read_bytes() == b"the tree's own build" and not os.path.exists(str(so) + ".part")
    # a manifest that names another file's digest is refused the same way
    carry.pack(str(root), str(dest), strip=False)
    m = json.loads((dest / carry.MANIFEST).read_text())
    m["extension"]["sha256"] = "0" * 64
    (dest / carry.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="damaged"):
        carry.unpack(str(root), str(dest))


def fake_wheel(path, so_bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(carry.SO, so_bytes)
        z.writestr("reparam_kernels/__init__.py", "")
    return path


def test_a_wheel_travels_alone_and_serves_the_extension(tmp_path):
    root, so = fake_tree(tmp_path, b"the tree's own build")
    dest = tmp_path / "carry"
    carry.pack(str(root), str(dest), strip=False)
    old = fake_wheel(tmp_path / "reparam_kernels-0.0.9-cp310-abi3-linux_x86_64.whl", b"old")
    new = fake_wheel(tmp_path / "reparam_kernels-0.1.0-cp310-abi3-linux_x86_64.whl", os.urandom(5000))
    carry.pack(str(root), str(dest), wheel=str(old))
    m = carry.pack(str(root), str(dest), wheel=str(new))
    # only the newest wheel travels, and not the tree's build beside it (the two would not fit a transfer)
    assert sorted(p.name for p in dest.iterdir()) == sorted([new.name, carry.MANIFEST])
    assert m["wheel"] == {"file": new.name, "sha256": carry.sha256(str(new))}
    carry.unpack(str(root), str(dest))
    assert so.read_bytes() == zipfile.ZipFile(new).read(carry.SO)
    # a damaged wheel replaces nothing
    so.write_bytes(b"the tree's own build")
    (dest / new.name).write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="damaged"):
        carry.unpack(str(root), str(dest))
    assert so.read_bytes() == b"the tree's own build"
    # packing without a wheel again leaves none behind
    assert carry.pack(str(root), str(dest), strip=False)["wheel"] is None and not list(dest.glob("*.whl"))
    bad = tmp_path / "empty.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x", "")
    with pytest.raises(SystemExit, match="not a wheel holding"):
        carry.pack(str(root), str(dest), wheel=str(bad))


def test_pack_says_what_is_missing_or_stale(tmp_path, capsys):
    root, so = fake_tree(tmp_path, b"x" * 100)
    os.utime(root / "csrc" / "op.cu", (os.path.getmtime(so) + 10,) * 2)  # a source edited after the build
    carry.pack(str(root), str(tmp_path / "carry"), strip=False)
    assert "newer than" in capsys.readouterr().err
    so.unlink()
    with pytest.raises(SystemExit, match="not built"):
        carry.pack(str(root), str(tmp_path / "carry2"), strip=False)
    with pytest.raises(SystemExit, match="pack"):
        carry.unpack(str(root), str(tmp_path / "nowhere"))


def session_script():
    with open(os.path.join(ROOT, "benchmarks", "gpu_session.sh")) as f:
        return f.read()


def test_gpu_session_decode_variants_exist():
    """Every default decode variant parses and names a layer kind the bench knows (a typo would fail on the GPU)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_decode
    from reparam_kernels.bench import variants

    names = re.search(r'GPU_SESSION_VARIANTS:-([^}"]+)', session_script()).group(1).split(",")
    assert names[0] == "dense" and len(set(names)) == len(names)
    for name in names:
        kind = bench_decode.split_variant(name)[0]
        assert kind is None or variants.available([kind]) == [kind], name
    # the targets come first, so a run cut short still measures them
    assert names[1:4] == ["int4_g128+fused", "int8+fused", "lowrank_40+fused"]


def test_gpu_session_refuses_a_bad_stage_and_a_bad_carry(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path))
    r = subprocess.run(["bash", script, "everything"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    # a tree whose .carry/ is missing stops before any step runs (exit 4), whatever the machine
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "tools").mkdir()
    (tree / "benchmarks" / "gpu_session.sh").write_text(session_script())
    (tree / "tools" / "carry.py").write_text(open(os.path.join(ROOT, "tools", "carry.py")).read())
    r = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_session.sh"), "decode"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 4 and "carry.py pack" in r.stderr
