"""Graph passes of the runlora backend: find LoRA sites, rewrite them, tag recomputation."""

# runlora_fx imports these passes; initialising it first lets `import passes.find_sites` work on
# its own instead of meeting a half-initialised runlora_fx.
import runlora_fx  # noqa: F401
