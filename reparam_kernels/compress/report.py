"""What a compression cost: per layer and in total."""
from dataclasses import asdict, dataclass, field


def state_bytes(module, float_bytes=None):
    """(elements, bytes) of a module's persistent state (parameters and buffers), shared storage counted once.
    float_bytes: count each floating-point element at that many bytes (2: as deployed in fp16 / bf16,
    whatever dtype the model is in now); integer tensors (packed codes) always as stored."""
    seen, n, b = set(), 0, 0
    for t in module.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        n += t.numel()
        b += t.numel() * (float_bytes if float_bytes and t.is_floating_point() else t.element_size())
    return n, b


@dataclass
class LayerReport:
    name: str
    method: str
    settings: dict
    shape: tuple            # (out_features, in_features) of the dense layer
    params_before: int
    params_after: int       # stored elements (int codes count one each)
    bytes_before: int
    bytes_after: int
    weight_error: float     # ‖W − Ŵ‖_F / ‖W‖_F
    output_error: float = None  # ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ on the calibration inputs (None without calib)
    seconds: float = 0.0
    bytes_after_16bit: int = None  # bytes_after with floating tensors (scales, zeros, factors) at 16 bits
    calib_rows: int = None  # calibration tokens the layer saw (an expert: those routed to it); None without calib

    @property
    def bits_per_weight(self):
        """As stored now (an fp32 model's scales at 32 bits)."""
        return 8.0 * self.bytes_after / (self.shape[0] * self.shape[1])

    @property
    def bits_per_weight_16bit(self):
        """As deployed in fp16 / bf16 — what `mean_bits` budgets; None where not recorded."""
        return None if self.bytes_after_16bit is None else 8.0 * self.bytes_after_16bit / (self.shape[0] * self.shape[1])


def _bits(stored, at16):
    """'5.37 (5.00 in fp16)' where the model's floats are not 16-bit, else '5.00'."""
    return f"{stored:.2f}" if at16 is None or abs(stored - at16) < 0.005 else f"{stored:.2f} ({at16:.2f} in fp16)"


@dataclass
class CompressionReport:
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    uncalibrated: list = field(default_factory=list)  # layers no calibration token reached, built data-free
    # experts' up projections no calibration token reached, calibrated on their sibling experts' inputs (pooled)
    pooled: list = field(default_factory=list)
    # experts that saw fewer calibration tokens than their input width, under a method using XᵀX or the Fisher
    # (the quantizers among them lean on a prior there: expert_stats.py)
    few_tokens: list = field(default_factory=list)

    def totals(self):
        t = {k: sum(getattr(l, k) for l in self.layers)
             for k in ("params_before", "params_after", "bytes_before", "bytes_after")}
        weights = sum(l.shape[0] * l.shape[1] for l in self.layers)
        t["layers"] = len(self.layers)
        t["param_reduction"] = 1 - t["params_after"] / t["params_before"] if t["params_before"] else 0.0
        t["bits_per_weight"] = 8.0 * t["bytes_after"] / weights if weights else 0.0
        at16 = [l.bytes_after_16bit for l in self.layers]
        t["bits_per_weight_16bit"] = 8.0 * sum(at16) / weights if weights and None not in at16 else None
        errs = [l.output_error for l in self.layers if l.output_error is not None]
        t["mean_output_error"] = sum(errs) / len(errs) if errs else None
        t["mean_weight_error"] = sum(l.weight_error for l in self.layers) / max(len(self.layers), 1)
        t["seconds"] = self.seconds
        return t

    def to_dict(self):
        return {"layers": [dict(asdict(l), bits_per_weight=l.bits_per_weight, bits_per_weight_16bit=l.bits_per_weight_16bit)
                           for l in self.layers],
                "totals": self.totals()}

    def table(self, max_rows=None):
        """A markdown table, one row per layer, then the totals."""
        rows = ["| layer | method | params before → after | bytes before → after | bits/weight | weight err | output err |",
                "|---|---|---|---|---|---|---|"]
        layers = self.layers if max_rows is None else self.layers[:max_rows]
        for l in layers:
            oe = "—" if l.output_error is None else f"{l.output_error:.4f}"
            rows.append(f"| {l.name} | {l.method} | {l.params_before:,} → {l.params_after:,} | "
                        f"{l.bytes_before:,} → {l.bytes_after:,} | {_bits(l.bits_per_weight, l.bits_per_weight_16bit)} | "
                        f"{l.weight_error:.4f} | {oe} |")
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append(f"| … {len(self.layers) - max_rows} more | | | | | | |")
        t = self.totals()
        oe = "—" if t["mean_output_error"] is None else f"{t['mean_output_error']:.4f} (mean)"
        rows.append(f"| **total ({t['layers']} layers)** | | {t['params_before']:,} → {t['params_after']:,} "
                    f"(−{100 * t['param_reduction']:.1f}%) | {t['bytes_before']:,} → {t['bytes_after']:,} | "
                    f"{_bits(t['bits_per_weight'], t['bits_per_weight_16bit'])} | {t['mean_weight_error']:.4f} (mean) | {oe} |")
        return "\n".join(rows)

    def __str__(self):
        return self.table(max_rows=20)
