"""Graph passes of the runlora backend: find LoRA sites, rewrite them, tag recomputation."""
