"""Run the benchmarks (every op vs cuBLAS, graph + eager), write JSON, a markdown table and a roofline plot.

    python -m reparam_kernels bench [--quick] [--only lowrank,quant] [--decode] [--out DIR]
    python -m reparam_kernels bench --render-only      # remake docs from the committed JSON (no GPU)
    python -m reparam_kernels bench --merge RUN_DIR    # a later run's files over the committed ones, then docs
    python -m reparam_kernels bench --peers DIR        # each A/B peer against the default, over DIR's results
    python -m reparam_kernels bench --targets DIR      # the issues' speed targets: met, missed, not measured

The scripts are ``benchmarks/bench_*.py`` of the source tree (each also runs on
its own). Results: ``<out>/<gpu>/<op>.json``; the markdown goes into the results
section of docs/benchmarks.md, the roofline into docs/roofline_<gpu>.png and the targets
table (over ``<out>/h200``: the targets are the H200's) into docs/status.md.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

from ..bench.cases import progress
from ..bench.results import (DEFAULT_ROOT, NOT_GPU_RESULTS, OUT_ENV, gpu_slug, is_decode, load, merge, merge_decode,
                             render_decode, render_files, result_files, write_json)
from ..bench.peers import render as render_peers, summarize as summarize_peers
from ..bench.targets import check as check_targets, render as render_targets
from ..bench.roofline import plot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"
TARGETS_BEGIN, TARGETS_END = "<!-- targets:begin -->", "<!-- targets:end -->"
TARGETS_GPU = "h200"  # every issue's target and baseline is the H200's


def find_scripts(bench_dir, only=None, decode=False):
    scripts = sorted(glob.glob(os.path.join(bench_dir, "bench_*.py")))
    names = {os.path.basename(s)[len("bench_"):-3]: s for s in scripts}
    if not decode:
        names.pop("decode", None)
    if only:
        missing = [o for o in only if o not in names]
        if missing:
            raise SystemExit(f"bench: --only names {missing}, not among {sorted(names)}")
        names = {k: v for k, v in names.items() if k in only}
    return names


def write_docs(result_dir, doc_path, png_dir):
    """Results section of `doc_path` and one roofline PNG per GPU folder of `result_dir`."""
    sections = []
    for gpu_dir in sorted(glob.glob(os.path.join(result_dir, "*"))):
        # CPU smoke runs (e.g. bench_decode --tiny) are no results; quality/ holds the accuracy studies
        if os.path.basename(gpu_dir) in NOT_GPU_RESULTS or not os.path.isdir(gpu_dir):
            continue
        files = sorted(glob.glob(os.path.join(gpu_dir, "*.json")))
        op_files = [f for f in files if not is_decode(f)]
        decodes = [f for f in files if is_decode(f)]
        if not op_files and not decodes:
            continue
        slug = os.path.basename(gpu_dir)
        sections.append(f"### {slug}\n\n" + (render_files(op_files) if op_files else ""))
        for decode in decodes:
            with open(decode) as f:
                sections.append(render_decode(json.load(f)))
        png = op_files and plot([load(f) for f in op_files], os.path.join(png_dir, f"roofline_{slug}.png"))
        if png:
            rel = os.path.relpath(png, os.path.dirname(os.path.abspath(doc_path)))
            sections.append(f"![roofline {slug}]({rel})\n")
    body = "\n".join(sections) if sections else "No GPU results yet.\n"
    return splice(doc_path, BEGIN, END, body, "# Benchmarks", "## Results")


def splice(doc_path, begin, end, body, title, heading):
    """Replace what lies between the markers `begin` and `end` of `doc_path` with `body` (the file, or the
    section under `heading`, made where missing)."""
    text = open(doc_path).read() if os.path.exists(doc_path) else f"{title}\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(doc_path, "w") as f:
        f.write(f"{head}{begin}\n{body}{end}{tail}")
    return doc_path


def write_targets(result_dir, doc_path):
    """The targets table of `result_dir`/h200 into `doc_path`'s targets section (None where no H200 results)."""
    gpu_dir = os.path.join(result_dir, TARGETS_GPU)
    if not os.path.isdir(gpu_dir):
        return None
    return splice(doc_path, TARGETS_BEGIN, TARGETS_END, render_targets(check_targets(gpu_dir)), "# Status",
                  "## The issues' speed targets")


def merge_run(run_dir, out):
    """Every <gpu>/<op>.json under run_dir merged over out/<gpu>/<op>.json (results.merge: the rows the run
    did not measure stay, marked with their own run); a decode file likewise by (variant, batch) where the two
    runs' setups match, else it replaces the committed one whole (results.merge_decode)."""
    done = []
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "*.json"), recursive=True)):
        slug, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
        if slug in NOT_GPU_RESULTS:
            continue
        dest = os.path.join(out, slug, name)
        if is_decode(name):
            with open(path) as f:
                data = json.load(f)
            if os.path.exists(dest):
                with open(dest) as f:
                    data = merge_decode(json.load(f), data)
        else:
            data = merge(load(dest), load(path)) if os.path.exists(dest) else load(path)
        write_json(dest, data)
        done.append(dest)
    if not done:
        raise SystemExit(f"bench: --merge found no result files under {run_dir}")
    for d in done:
        print(f"bench: merged {d}")
    return done


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reparam_kernels bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes (passed to every script)")
    p.add_argument("--only", default=None, help="comma-separated script names, e.g. lowrank,quant")
    p.add_argument("--decode", action="store_true", help="also run bench_decode.py (end-to-end, slow)")
    p.add_argument("--out", default=None, help=f"results root (default benchmarks/results or ${OUT_ENV})")
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"), help="markdown file to update")
    p.add_argument("--render-only", action="store_true", help="skip running; remake docs from the JSON files")
    p.add_argument("--merge", default=None, metavar="RUN_DIR",
                   help="skip running; merge a run's result files (e.g. one dtype) over --out's, then remake docs")
    p.add_argument("--peers", default=None, metavar="DIR",
                   help="skip running; print each A/B peer against the op's default over DIR's result files")
    p.add_argument("--targets", default=None, metavar="DIR",
                   help="skip running; print the issues' speed targets checked against DIR's result files")
    p.add_argument("--status-doc", default=None,
                   help="markdown file whose targets section is remade from <out>/h200 (default: status.md "
                        "beside --docs)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per script")
    args = p.parse_args(argv)
    out = args.out or os.environ.get(OUT_ENV) or DEFAULT_ROOT
    if args.peers:
        files = result_files(args.peers)[0]
        if not files:
            print(f"bench: --peers found no result files under {args.peers}", file=sys.stderr)
            return 2
        print(render_peers(summarize_peers(files)), end="")
        return 0
    if args.targets:
        if not os.path.exists(args.targets):
            print(f"bench: --targets: no such file or folder {args.targets}", file=sys.stderr)
            return 2
        print(render_targets(check_targets(args.targets)), end="")
        return 0
    status = 0
    if args.merge:
        merge_run(args.merge, out)
    elif not args.render_only:
        import torch

        if not torch.cuda.is_available():
            print("bench: no CUDA GPU visible; the benchmarks need one (try --render-only)", file=sys.stderr)
            return 2
        bench_dir = os.path.join(REPO, "benchmarks")
        if not os.path.isdir(bench_dir):
            print(f"bench: no benchmarks/ folder next to the package ({REPO}); run from a source checkout",
                  file=sys.stderr)
            return 2
        scripts = find_scripts(bench_dir, args.only.split(",") if args.only else None, args.decode)
        env = dict(os.environ, **{OUT_ENV: out}, PYTHONPATH=os.pathsep.join(
            [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        for name in progress(scripts, "bench scripts"):
            cmd = [sys.executable, scripts[name]] + (["--quick"] if args.quick else [])
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            print(f"bench: {name}: exit {rc} after {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            status = status or (rc != 0)
        print(f"bench: results under {os.path.join(out, gpu_slug(torch.cuda.get_device_name()))}")
    docs_dir = os.path.dirname(os.path.abspath(args.docs))
    print(f"bench: wrote {write_docs(out, args.docs, docs_dir)}")
    targets_doc = write_targets(out, args.status_doc or os.path.join(docs_dir, "status.md"))
    if targets_doc:
        print(f"bench: wrote the targets table into {targets_doc}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
