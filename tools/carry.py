"""Moves the extension built on a CPU machine to a GPU machine that runs the tree as it is (no compiler
there): `pack` here, `unpack` there (benchmarks/gpu_session.sh does it first).

    python3 tools/carry.py pack [--wheel dist/reparam_kernels-*.whl]   # -> .carry/
    python3 tools/carry.py unpack                                        # .carry/ -> reparam_kernels/_C.abi3.so

Why: the built `_C.abi3.so` (sm_80 + sm_90a) is ~91 MB with its debug sections stripped, and a transfer to
such a machine may be capped near 64 MB; xz makes it ~16 MB. A wheel is a zip already deflated (xz gains
nothing on it), so it travels as it is, and the extension the tree uses is the wheel's own (the two would not
fit together). `.carry/manifest.json` records the commit it was packed at and the SHA-256 of the unpacked
file, so `unpack` refuses a damaged copy and says when the tree it lands in is at another commit (its kernels
may then be older than the sources).
"""
import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO = os.path.join("reparam_kernels", "_C.abi3.so")
PACKED = "_C.abi3.so.xz"
MANIFEST = "manifest.json"


def sha256(path):
    with open(path, "rb") as f:
        return _digest(f)[0]


def _digest(f):
    """(SHA-256, bytes) of an open binary file, read in blocks (an extension is ~100-200 MB). (The package has
    its own hash helper; this tool runs before the package can be imported, so it keeps one.)"""
    h, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
        size += len(block)
    return h.hexdigest(), size


def git_head(root):
    """(commit, whether tracked files differ from it) of the tree at `root`; (None, None) outside git."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return head, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def newer_sources(root, built):
    """Kernel sources modified after the extension was built: a sign it is stale."""
    t = os.path.getmtime(built)
    csrc = os.path.join(root, "csrc")
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(csrc) for f in files
                  if os.path.getmtime(os.path.join(d, f)) > t)


def _xz(src, out, preset):
    if shutil.which("xz"):  # the command line tool runs threads; Python's lzma writes the same format
        with open(out, "wb") as f:
            subprocess.run(["xz", "-T0", f"-{preset}", "-c", src], stdout=f, check=True)
    else:
        with open(src, "rb") as fi, lzma.open(out, "wb", preset=preset) as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)


def _pack_built(root, dest, strip, preset):
    """The tree's build, debug-stripped and xz-compressed: the manifest's "extension"."""
    built = os.path.join(root, SO)
    if not os.path.exists(built):
        raise SystemExit(f"carry pack: {SO} is not built; build it first (README, Build):\n"
                         "  REPARAM_CUDA_ARCHS='80;90a' pip install --no-build-isolation -e .")
    stale = newer_sources(root, built)
    if stale:
        print(f"carry pack: WARNING: {len(stale)} kernel source(s) newer than {SO} (e.g. {stale[0]}): rebuild?",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "_C.abi3.so")
        shutil.copyfile(built, src)
        # debug sections only: the symbols the loader needs stay
        stripped = bool(strip and shutil.which("strip")) and \
            subprocess.run(["strip", "--strip-debug", src]).returncode == 0
        ext = {"file": PACKED, "unpacks_to": SO, "sha256": sha256(src), "bytes": os.path.getsize(src),
               "debug_stripped": stripped}
        _xz(src, os.path.join(dest, PACKED), preset)
    return ext


def _pack_wheel(dest, wheel):
    """The wheel as it is; the extension is its `_C.abi3.so` (the tree's own build would not fit beside it)."""
    name = os.path.basename(wheel)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SO) as member:
            digest, size = _digest(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise SystemExit(f"carry pack: --wheel {wheel}: not a wheel holding {SO} ({e})")
    shutil.copyfile(wheel, os.path.join(dest, name))
    return ({"file": name, "member": SO, "unpacks_to": SO, "sha256": digest, "bytes": size},
            {"file": name, "sha256": sha256(wheel)})


def pack(root, dest, wheel=None, strip=True, preset=6):
    """Fills `dest` with what travels: the tree's extension (xz), or a wheel and the extension inside it."""
    os.makedirs(dest, exist_ok=True)
    for old in os.listdir(dest):  # what an earlier pack left must not travel (or be tested) in this one's place
        if old.endswith(".whl") or old == PACKED:
            os.remove(os.path.join(dest, old))
    head, dirty = git_head(root)
    manifest = {"commit": head, "dirty": dirty, "wheel": None}
    if wheel:
        manifest["extension"], manifest["wheel"] = _pack_wheel(dest, wheel)
    else:
        manifest["extension"] = _pack_built(root, dest, strip, preset)
    with open(os.path.join(dest, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    ext = manifest["extension"]
    total = sum(os.path.getsize(os.path.join(dest, n)) for n in os.listdir(dest))
    print(f"carry pack: {SO} ({ext['bytes'] / 1e6:.1f} MB{', debug stripped' if ext.get('debug_stripped') else ''}) "
          f"in {ext['file']}; {dest} holds {total / 2**20:.1f} MiB"
          + (f"; commit {head[:10]}{' + uncommitted changes' if dirty else ''}" if head else ""))
    return manifest


def _extract(src, ext, partial):
    """Writes the extension to `partial`; False when the copy is damaged (its digest or its stream)."""
    path = os.path.join(src, ext["file"])
    try:
        if "member" in ext:
            with zipfile.ZipFile(path) as z, z.open(ext["member"]) as fi, open(partial, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
        else:
            with lzma.open(path, "rb") as fi, open(partial, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
    except (lzma.LZMAError, EOFError, zipfile.BadZipFile, KeyError):
        return False
    return sha256(partial) == ext["sha256"]


def unpack(root, src):
    path = os.path.join(src, MANIFEST)
    if not os.path.exists(path):
        raise SystemExit(f"carry unpack: no {path}: run `python3 tools/carry.py pack` on the build machine first")
    with open(path) as f:
        manifest = json.load(f)
    wheel = manifest.get("wheel")
    if wheel and sha256(os.path.join(src, wheel["file"])) != wheel["sha256"]:
        raise SystemExit(f"carry unpack: {wheel['file']} is damaged (SHA-256 differs); nothing was replaced")
    ext = manifest["extension"]
    target = os.path.join(root, ext["unpacks_to"])
    partial = target + ".part"
    if not _extract(src, ext, partial):
        if os.path.exists(partial):
            os.remove(partial)
        raise SystemExit(f"carry unpack: {ext['file']} does not unpack to the file that was packed (SHA-256 "
                         "differs or the stream is broken): the copy is damaged; nothing was replaced")
    os.chmod(partial, 0o755)
    os.replace(partial, target)  # whole or not at all: a half-written extension never sits in the tree
    head, _ = git_head(root)
    built = manifest.get("commit")
    if built and head and head != built:
        print(f"carry unpack: WARNING: packed at {built[:10]}, this tree is at {head[:10]}", file=sys.stderr)
    print(f"carry unpack: {ext['unpacks_to']} ({ext['bytes'] / 1e6:.1f} MB) from {ext['file']}, packed at "
          f"{(built or 'an unknown commit')[:10]}{' + uncommitted changes' if manifest.get('dirty') else ''}")
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("pack", "unpack"))
    p.add_argument("--dir", default=os.path.join(ROOT, ".carry"), help="the folder that travels (default .carry)")
    p.add_argument("--root", default=ROOT, help="the source tree (default: this checkout)")
    p.add_argument("--wheel", default=None, help="pack: a built wheel to travel beside the extension")
    p.add_argument("--no-strip", action="store_true", help="pack: keep the debug sections")
    a = p.parse_args(argv)
    if a.action == "pack":
        if a.wheel and not os.path.exists(a.wheel):
            raise SystemExit(f"carry pack: --wheel {a.wheel}: no such file")
        pack(a.root, a.dir, wheel=a.wheel, strip=not a.no_strip)
    else:
        unpack(a.root, a.dir)


if __name__ == "__main__":
    main()
