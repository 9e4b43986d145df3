"""A zoo of tiny LoRA training setups from several libraries, for testing the site matcher.

Each builder returns a `Case`: a model in train mode (random weights, no downloads, hidden <= 64,
1-2 layers, deterministic: `torch.manual_seed(0)` first), its example inputs, and a loss over the
model's output. lora_B is made non-zero, so every LoRA grad is meaningful. `case.step()` runs one
eager training step (forward, loss, backward); `case.step(torch.compile(case.model, ...))` runs it
through a compiled model; dropout draws from the global RNG, so seed before each step to compare
two runs (and set `torch._inductor.config.fallback_random`). Optional libraries are imported
inside the builders through `need()`, which skips the calling test when one is missing, so this
file imports with torch and pytest alone. Do not `copy.deepcopy` an NF4 model (it re-quantizes):
call its builder twice instead — builders are deterministic.

    gpt2_peft            GPT-2 Conv1D (x @ W, W in×out) + PEFT LoRA, fan_in_fan_out=True
    bert_peft            BERT classifier + PEFT; the model's own dropouts feed the sites
    dropout_linear_peft  nn.Dropout(p) then one PEFT-wrapped nn.Linear (the minimal BERT repro)
    t5_peft              T5ForConditionalGeneration + PEFT on q, k, v, o, wi, wo
    hf_peft              any of ARCHITECTURES (decoders, encoders, encoder-decoders, ViT) + PEFT
                         on every linear ("all-linear")
    bnb_llama_peft       QLoRA: Llama loaded through BitsAndBytesConfig (4- or 8-bit, on CPU)
    nf4_lora_module      torchao linear_nf4 base + hand-written LoRA branch
    torchtune_llama      torchtune lora_llama2 (quantize_base=True: QLoRA over torchao NF4)
    loralib_linear       loralib.Linear (`result += (drop(x) @ A.T @ B.T) * s`, in place)
    loralib_merged_linear  loralib.MergedLinear, enable_lora=[True, False, True]
    dora_llama           PEFT DoRA (use_dora=True) on Llama
    peft_bf16_llama      Llama cast to bf16, then get_peft_model (adapters stay fp32)
    autocast_llama       fp32 PEFT Llama run under torch.autocast("cpu", bfloat16)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, BATCH, SEQ = 128, 2, 8


def need(module: str) -> types.ModuleType:
    """Import an optional library, or skip the calling test (pytest.importorskip)."""
    return pytest.importorskip(module)


@dataclass
class Case:
    """A model, its inputs and a loss: one training step of a LoRA setup."""

    model: nn.Module
    args: tuple[Any, ...]
    loss: Callable[[Any], torch.Tensor]  # the model's output -> a scalar
    kwargs: dict[str, Any] = field(default_factory=dict)
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def step(self, fn: Callable[..., Any] | None = None) -> torch.Tensor:
        """Forward (through `fn`, default the model), loss, backward; returns the loss."""
        with self.context():
            loss = self.loss((self.model if fn is None else fn)(*self.args, **self.kwargs))
        loss.backward()
        return loss.detach()


def nonzero_lora_b(model: nn.Module, seed: int = 0) -> None:
    """Libraries zero-init lora_B (PEFT, loralib, torchtune): make the branch contribute."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_b" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1)


def _tokens(*shape: int, high: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _logits_loss(out: Any) -> torch.Tensor:
    return out.logits.float().square().mean()


def _mean_square(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def _peft(model: nn.Module, targets: list[str], **lora: Any) -> nn.Module:
    peft = need("peft")
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **lora})
    model = peft.get_peft_model(model, config)
    nonzero_lora_b(model)
    return model.train()


def _llama_config(hidden: int = 32, layers: int = 1) -> Any:
    transformers = need("transformers")
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64,
    )


def _llama_case(model: nn.Module, **context: Any) -> Case:
    ids = _tokens(BATCH, SEQ)
    ctx = functools.partial(torch.autocast, "cpu", **context) if context else contextlib.nullcontext
    return Case(model, (ids,), _logits_loss, context=ctx)


def gpt2_peft(lora_dropout: float = 0.1) -> Case:
    """GPT-2's Conv1D: base is `addmm(b, x.view(-1, d_in), W[d_in, d_out]).view(...)`."""
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1,
                                     n_head=4)
    model = _peft(transformers.GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"],
                  fan_in_fan_out=True, lora_dropout=lora_dropout)
    return Case(model, (_tokens(BATCH, SEQ),), _logits_loss)


def bert_peft(lora_dropout: float = 0.0, hidden_dropout: float = 0.1) -> Case:
    """BERT classifier: embeddings' and attention-output dropouts feed q/k/v and dense."""
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=hidden_dropout,
    )
    model = _peft(transformers.BertForSequenceClassification(config),
                  ["query", "key", "value", "dense"], lora_dropout=lora_dropout,
                  task_type="SEQ_CLS")
    return Case(model, (_tokens(BATCH, SEQ),), _logits_loss)


def dropout_linear_peft(p: float, lora_dropout: float = 0.0) -> Case:
    """`nn.Dropout(p)` feeding one PEFT-wrapped `nn.Linear(32, 48)`."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("drop", nn.Dropout(p))
    model.add_module("fc", nn.Linear(32, 48))
    model = _peft(model, ["fc"], lora_dropout=lora_dropout)
    return Case(model, (torch.randn(BATCH, SEQ, 32, requires_grad=True),), _mean_square)


def t5_peft(lora_dropout: float = 0.0) -> Case:
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_decoder_layers=1, num_heads=4, dropout_rate=0.1,
                                   decoder_start_token_id=0)
    model = _peft(transformers.T5ForConditionalGeneration(config),
                  ["q", "k", "v", "o", "wi", "wo"], lora_dropout=lora_dropout)
    ids, dec = _tokens(BATCH, SEQ), _tokens(BATCH, SEQ // 2, seed=2)
    return Case(model, (), _logits_loss, {"input_ids": ids, "decoder_input_ids": dec})


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=64)
_GQA = dict(_DECODER, num_key_value_heads=2)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                decoder_start_token_id=0)
_NO_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
# name → (transformers model class, its config's keyword arguments, inputs): the LoRA site
# shapes the model families bring — GQA, qkv bias, fused qkv (GPT-NeoX, Falcon, BLOOM, Phi-3's
# qkv_proj and gate_up_proj), parallel attention and MLP (GPT-J, Falcon), post-norm encoders,
# cross-attention (BART, Whisper), patch embeddings (ViT)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "mistral": ("MistralForCausalLM", _GQA, "tokens"),
    "qwen2": ("Qwen2ForCausalLM", _GQA, "tokens"),
    "qwen3": ("Qwen3ForCausalLM", dict(_GQA, head_dim=8), "tokens"),
    "gemma2": ("Gemma2ForCausalLM", dict(_GQA, head_dim=8), "tokens"),
    "phi": ("PhiForCausalLM", _DECODER, "tokens"),
    "phi3": ("Phi3ForCausalLM", dict(_DECODER, **_NO_SPECIAL_TOKENS), "tokens"),
    "opt": ("OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   max_position_embeddings=64, word_embed_proj_dim=32), "tokens"),
    "gpt_neox": ("GPTNeoXForCausalLM", _DECODER, "tokens"),
    "falcon": ("FalconForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4), "tokens"),
    "bloom": ("BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4),
              "tokens"),
    "gptj": ("GPTJForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                     n_positions=64, rotary_dim=4, **_NO_SPECIAL_TOKENS),
             "tokens"),
    "roberta": ("RobertaForMaskedLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64,
                                           max_position_embeddings=64), "tokens"),
    "distilbert": ("DistilBertForMaskedLM", dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4,
                                                 hidden_dim=64, max_position_embeddings=64),
                   "tokens"),
    "vit": ("ViTForImageClassification", dict(image_size=16, patch_size=8, hidden_size=32,
                                              num_hidden_layers=1, num_attention_heads=4,
                                              intermediate_size=64, num_labels=3), "pixels"),
    "bart": ("BartForConditionalGeneration", dict(_SEQ2SEQ, max_position_embeddings=64),
             "seq2seq"),
    "whisper": ("WhisperForConditionalGeneration", dict(_SEQ2SEQ, num_mel_bins=8,
                                                        max_source_positions=8,
                                                        max_target_positions=16), "audio"),
}


def hf_peft(arch: str, lora_dropout: float = 0.1) -> Case:
    """A 1-layer transformers model of family `arch`, PEFT LoRA on every linear but the head."""
    transformers = need("transformers")
    model_class, config_kwargs, inputs = ARCHITECTURES[arch]
    model_class = getattr(transformers, model_class)
    torch.manual_seed(0)
    model = _peft(model_class(model_class.config_class(**config_kwargs)), "all-linear",
                  lora_dropout=lora_dropout)
    decoder = {"decoder_input_ids": _tokens(BATCH, SEQ // 2, seed=2)}
    if inputs == "pixels":
        return Case(model, (torch.randn(BATCH, 3, 16, 16),), _logits_loss)
    if inputs == "seq2seq":
        return Case(model, (), _logits_loss, {"input_ids": _tokens(BATCH, SEQ), **decoder})
    if inputs == "audio":  # log-mel features: num_mel_bins × 2·max_source_positions frames
        return Case(model, (), _logits_loss, {"input_features": torch.randn(BATCH, 8, 16),
                                              **decoder})
    return Case(model, (_tokens(BATCH, SEQ),), _logits_loss)


def bnb_llama_peft(bits: int = 4, lora_dropout: float = 0.1, double_quant: bool = True) -> Case:
    """QLoRA as users run it: save a tiny Llama, reload it through `BitsAndBytesConfig` on the
    CPU (bnb.nn.Linear4bit nf4 / Linear8bitLt in the layers), then get_peft_model (PEFT's bnb
    LoRA wrappers, as `is_loaded_in_4bit` is set). `double_quant`: QLoRA's quantized absmax."""
    transformers = need("transformers")
    need("bitsandbytes")
    torch.manual_seed(0)
    quant = dict(load_in_8bit=True) if bits == 8 else dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant)
    with tempfile.TemporaryDirectory() as path:
        transformers.LlamaForCausalLM(_llama_config()).save_pretrained(path)
        model = transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=transformers.BitsAndBytesConfig(**quant),
            device_map="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    return _llama_case(_peft(model, LLAMA_TARGETS, lora_dropout=lora_dropout))


def _nf4() -> types.ModuleType:
    """torchao's NF4 module: `torchao.dtypes.nf4tensor` before 0.18, then moved."""
    need("torchao")
    for name in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
                 "torchao.dtypes.nf4tensor"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    pytest.skip("torchao has no NF4 tensor")


class NF4LoRALinear(nn.Module):
    """`linear_nf4(x, W_nf4) + s * lora_b(lora_a(dropout(x)))`, as torchtune's LoRALinear."""

    def __init__(self, d_in: int, d_out: int, r: int = 4, alpha: float = 8.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        nf4 = _nf4()
        self.linear_nf4 = nf4.linear_nf4
        weight = torch.randn(d_out, d_in) / d_in**0.5
        # scaler_block_size 64: the default 256 needs d_in * d_out >= 64 * 256
        self.weight = nn.Parameter(nf4.to_nf4(weight, 64, 64), requires_grad=False)
        self.lora_a = nn.Linear(d_in, r, bias=False)
        self.lora_b = nn.Linear(r, d_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_nf4(x, self.weight)
        return out + self.scaling * self.lora_b(self.lora_a(self.dropout(x)))


def nf4_lora_module(x_requires_grad: bool, dropout: float = 0.1) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(NF4LoRALinear(64, 64, dropout=dropout)).train()
    nonzero_lora_b(model)
    x = torch.randn(BATCH, SEQ, 64, requires_grad=x_requires_grad)
    return Case(model, (x,), _mean_square)


class _Stub(types.ModuleType):
    """A stand-in for a data/tokenizer package torchtune imports but model code never calls."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise ImportError(f"{self.__name__}.{attr}: stubbed by lora_zoo")

        return missing


@contextlib.contextmanager
def _torchtune_importable() -> Iterator[None]:
    """torchtune 0.6 imports `torchao.dtypes.nf4tensor` (moved in torchao 0.18) and, at package
    import, datasets/omegaconf/sentencepiece/tiktoken (not installed here: --no-deps). Alias the
    first and stub whichever of the others is missing while torchtune imports, then take them
    back out of sys.modules (torchtune's modules keep their references; its models never use
    them)."""
    if importlib.util.find_spec("torchtune") is None:
        pytest.skip("could not import 'torchtune': not installed")
    nf4 = _nf4()
    missing = [m for m in ("datasets", "omegaconf", "sentencepiece", "tiktoken")
               if m not in sys.modules and importlib.util.find_spec(m) is None]
    alias = "torchao.dtypes.nf4tensor"
    added: dict[str, types.ModuleType] = {} if alias in sys.modules else {alias: nf4}
    for name in ("datasets", "datasets.distributed", "omegaconf", "sentencepiece", "tiktoken",
                 "tiktoken.load"):
        if name.split(".")[0] in missing:
            added[name] = _Stub(name)
            added[name].__path__ = []
    sys.modules.update(added)
    try:
        yield
    except ImportError as why:
        pytest.skip(f"could not import torchtune: {why}")
    finally:
        for name in added:
            sys.modules.pop(name, None)


def torchtune_llama(quantize_base: bool = True, lora_dropout: float = 0.1) -> Case:
    """torchtune's `lora_llama2` (its `qlora_llama2_*` = this with quantize_base=True), 1 layer,
    embed 64; LoRA on q, k, v, output_proj and the MLP."""
    with _torchtune_importable():
        from torchtune.models.llama2 import lora_llama2
        from torchtune.modules.peft import get_adapter_params, set_trainable_params
        import torchtune.modules.peft.lora as tt_lora
    torch.manual_seed(0)
    nf4 = _nf4()  # scaler_block_size 64: q_proj 64x64 has only 64 scalers (default needs 256)
    patch = functools.partial(nf4.to_nf4, block_size=64, scaler_block_size=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tt_lora, "to_nf4", patch)
        model = lora_llama2(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                            vocab_size=VOCAB, num_layers=1, num_heads=4, num_kv_heads=4,
                            embed_dim=64, max_seq_len=64, lora_rank=4, lora_alpha=8,
                            lora_dropout=lora_dropout, quantize_base=quantize_base)
    set_trainable_params(model, get_adapter_params(model))
    nonzero_lora_b(model)
    return Case(model.train(), (_tokens(BATCH, SEQ),), _mean_square)


def loralib_linear(lora_dropout: float = 0.1) -> Case:
    loralib = need("loralib")
    torch.manual_seed(0)
    model = nn.Sequential(loralib.Linear(32, 48, r=4, lora_alpha=8, lora_dropout=lora_dropout))
    loralib.mark_only_lora_as_trainable(model)
    nonzero_lora_b(model)
    return Case(model.train(), (torch.randn(BATCH, SEQ, 32),), _mean_square)


def loralib_merged_linear(lora_dropout: float = 0.1) -> Case:
    """A fused qkv: `result += drop(x) @ (zero_pad(conv1d(A, B, groups=2))).T * s`."""
    loralib = need("loralib")
    torch.manual_seed(0)
    model = nn.Sequential(loralib.MergedLinear(32, 96, r=4, lora_alpha=8,
                                               lora_dropout=lora_dropout,
                                               enable_lora=[True, False, True]))
    loralib.mark_only_lora_as_trainable(model)
    nonzero_lora_b(model)
    return Case(model.train(), (torch.randn(BATCH, SEQ, 32),), _mean_square)


def dora_llama(lora_dropout: float = 0.0) -> Case:
    transformers = need("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    return _llama_case(_peft(model, LLAMA_TARGETS, use_dora=True, lora_dropout=lora_dropout))


def peft_bf16_llama(lora_dropout: float = 0.0) -> Case:
    """PEFT's default half-precision setup: base bf16, adapters autocast to fp32 by PEFT."""
    transformers = need("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).to(torch.bfloat16)
    return _llama_case(_peft(model, LLAMA_TARGETS, lora_dropout=lora_dropout))


def autocast_llama(lora_dropout: float = 0.0) -> Case:
    """An fp32 PEFT Llama stepped under `torch.autocast("cpu", dtype=torch.bfloat16)`."""
    transformers = need("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    model = _peft(model, LLAMA_TARGETS, lora_dropout=lora_dropout)
    return _llama_case(model, dtype=torch.bfloat16)
