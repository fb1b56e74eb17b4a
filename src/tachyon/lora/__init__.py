"""LoRA at inference: PEFT adapters in fixed GPU slots, mixed in one batch.

``request`` (no torch) is what callers and the scheduler see; ``peft_files`` reads an adapter
directory; ``slots`` holds one layer's stacked adapter weights and applies them per token;
``kernels`` are the batched shrink/expand (Triton, with a torch reference); ``manager`` owns
the slots of a model, the CPU cache and the LRU between them.
"""
