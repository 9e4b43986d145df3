"""Graph passes of the runlora backend (installed as `runlora_fx.passes`): find LoRA sites,
group those that read the same x, rewrite them, tag recomputation."""
