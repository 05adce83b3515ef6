"""The only package that imports torch: base model loading, slot-pool LoRA, the engine."""
