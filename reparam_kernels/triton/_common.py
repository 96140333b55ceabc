import os

# Triton's CPU interpreter (TRITON_INTERPRET=1) computes tl.dot on bfloat16
# operands wrongly (checked with Triton 3.8: relative error ~1e9), so kernels
# upcast dot operands to fp32 there. On a GPU the native bf16 dot runs.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
