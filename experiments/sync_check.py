"""On a CUDA GPU: a compiled LoRA training step with dropout reads nothing back on the host.

A tiny PEFT Llama (2 layers, h 64, all 7 targets, lora_dropout 0.05) compiled with runlora,
one step to compile and warm up, then steps under `torch.cuda.set_sync_debug_mode("error")`,
which raises on any device-to-host sync. Exit 0 and "ok" when none happened.

    python experiments/sync_check.py            # needs a CUDA GPU; about 30 s
"""

from __future__ import annotations

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import runlora_fx

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    if not torch.cuda.is_available():
        print("sync_check: no CUDA device", file=sys.stderr)
        return 2
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=8, lora_dropout=0.05, target_modules=TARGETS)).cuda()
    backend = runlora_fx.Backend()
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 256, (4, 128), device="cuda")
    compiled(input_ids=ids, labels=ids).loss.backward()  # compiles; may sync while it does
    torch.cuda.synchronize()
    sparse = sum(d.chosen.plan.sparse_dropout for r in backend.reports for d in r.decisions)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            compiled(input_ids=ids, labels=ids).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"ok: 3 steps, no host sync; {sparse} planned calls with sparse dropout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
