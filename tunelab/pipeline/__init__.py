"""Code that runs inside a trial process (imports torch, DeepSpeed, transformers, peft)."""
