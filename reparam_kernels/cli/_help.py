"""Help texts the commands share (no torch import: `--help` stays quick)."""
MODEL_HELP = ("a Hugging Face model folder, a compressed checkpoint folder (save_compressed), a GPTQ / AWQ / "
              "compressed-tensors 4-bit folder (run on Int4Linear), a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct, offline)")
TEXT_HELP = "a UTF-8 text file, or austen:<novel> (offline: emma, persuasion, prideprejudice, …)"
DTYPE_HELP = "the model's float type while it runs (default fp32)"
