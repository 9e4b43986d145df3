"""Numerics of sparse dropout in 16 bits against PEFT's own path with the same mask.

A plan with sparse dropout computes D(x)·Aᵀ as (x·Aᵀ − S·Aᵀ)/q (runlora_fx/dropout.py): the
dense GEMM rounds x·Aᵀ, not D(x)·Aᵀ, and the corrections accumulate in fp32. Whether that is
as precise as PEFT's dense mask is measured here with precision_exp.py's rule and metrics
(docs/precision.md), per site kind and grid point, with one mask per point shared by the fp64
truth, PEFT (its lora_dropout replaced by that fixed mask, applied as aten's dropout applies
one: x·m·(1/q) in x's dtype) and runlora's programs (their positions replayed from the seed
they run under). Variants: `sparse-split` (PEFT's order, sparse dropout: what every 16-bit
dropout site may run once this passes) and `sparse-merged-nearest` (merged W + (s/q)·BA rounded
to nearest, corrected at the dropped positions; judged against the merged rule's own kinds).

    python experiments/dropout_precision_exp.py -o experiments/results/dropout_precision_cpu
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import precision_exp as pe  # noqa: E402
from precision_plans import MERGED, REFERENCE, site_of  # noqa: E402

from runlora_fx.ir.dropout import capacity, draw_seed, dropped_positions  # noqa: E402
from runlora_fx.ir.execute import UnitCall  # noqa: E402
from runlora_fx.ir.plans import Dropout, Plan, canonical  # noqa: E402
from runlora_fx.ir.rounding import Rounding  # noqa: E402
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup  # noqa: E402

PLANS = {
    "sparse-split": replace(REFERENCE, dropout=Dropout.SPARSE),
    "sparse-merged-nearest": replace(MERGED, rounding=Rounding.NEAREST, dropout=Dropout.SPARSE),
}
SEED = 97  # torch.manual_seed a runlora variant runs under: its positions follow from it


class FixedMask(nn.Module):
    """A dropout that applies one given keep mask, as aten's dropout applies its own."""

    def __init__(self, keep: Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.scale = keep, 1.0 / (1.0 - p)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.keep.to(x.dtype) * self.scale


def dropout_site(kind: pe.Kind, n: int, d: int, r: int, s: float, p: float) -> LoraSite:
    site = site_of(kind, n, d, r, s)
    return replace(site, adapters=(Adapter(r, p, s, True, True),))


def keep_mask(plan: Plan, site: LoraSite) -> Tensor:
    """The keep mask (bool, N×d) the plan's program draws under torch.manual_seed(SEED)."""
    unit = SiteGroup((site,))
    planned = UnitCall("precision", unit, canonical(plan, unit))
    numel = site.n * site.d_in
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        seeds = {s.out: draw_seed(torch.empty(0), s.out)
                 for s in planned.program.forward if s.op == "seed"}
    [step] = [s for s in planned.program.forward if s.op == "positions"]
    buffer = dropped_positions(seeds[step.args[0]], numel, step.p, capacity(numel, step.p),
                               torch.device("cpu"))
    keep = torch.ones(numel, dtype=torch.bool)
    keep[buffer[: int(buffer[-1])].long()] = False
    return keep.view(site.n, site.d_in)


def truth(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind: pe.Kind,
          keep: Tensor, p: float) -> pe.Truth:
    x64, W64, A64, B64, dy64 = (t.to(pe.F64) for t in (x, W, A, B, dy))
    scaled = keep.to(pe.F64) / (1 - p)
    xd = x64 * scaled
    h = xd @ A64.T
    base, effect = x64 @ W64.T, s * (h @ B64.T)
    g = s * dy64
    dh = g @ B64
    y0 = (x.to(kind.compute) @ W.to(kind.compute).T).to(pe.F64)
    return pe.Truth(base, effect, base + effect, dy64 @ W64 + (dh @ A64) * scaled, dh.T @ xd,
                    g.T @ h, y0)


def peft(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind: pe.Kind,
         keep: Tensor, p: float) -> pe.Result:
    model = pe.peft_layer(kind, W, A, B, s)
    layer = model.base_model.model[0]
    layer.lora_dropout["default"] = FixedMask(keep, p)
    xg = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=kind.compute, enabled=kind.autocast):
        y = model(xg)
    y.backward(dy)
    return (y.detach(), xg.grad, layer.lora_A["default"].weight.grad,  # type: ignore[return-value]
            layer.lora_B["default"].weight.grad)


def runlora(plan: Plan, site: LoraSite, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float,
            dy: Tensor) -> pe.Result:
    unit = SiteGroup((site,))
    planned = UnitCall("precision", unit, canonical(plan, unit))
    xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, A, B))
    by_role = {"x": xg, "W": W, "A": ag, "B": bg}
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        y = planned([by_role[op.role.value] for op in planned.operands], [s])
    y.backward(dy)
    return y.detach(), xg.grad, ag.grad, bg.grad  # type: ignore[return-value]


def run_point(point: pe.Point, p: float, kinds: Sequence[pe.Kind], s: float,
              seed: int) -> list[dict[str, Any]]:
    x64, W64, A64, B64, dy64 = pe.master(point, s, seed)
    rows = []
    for kind in kinds:
        x, W, dy = x64.to(kind.store), W64.to(kind.store), dy64.to(kind.compute)
        A, B = A64.to(kind.adapter), B64.to(kind.adapter)
        site = dropout_site(kind, point.n, point.d, point.r, s, p)
        keep = keep_mask(PLANS["sparse-split"], site)  # every plan draws the same from SEED
        t = truth(x, W, A, B, s, dy, kind, keep, p)
        results = {pe.BASELINE: peft(x, W, A, B, s, dy, kind, keep, p)}
        for name, plan in PLANS.items():
            assert torch.equal(keep_mask(plan, site), keep)
            results[name] = runlora(plan, site, x, W, A, B, s, dy)
        found = {name: pe.measure(res, t, results[pe.BASELINE][0]) for name, res in results.items()}
        for name in results:
            rows.append({"kind": kind.name, "variant": name, "weights": point.weights,
                         "d": point.d, "n": point.n, "r": point.r, "rel": point.rel, "p": p,
                         **found[name], **pe.judge(found[name], found[pe.BASELINE])})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=list(pe.KINDS), choices=list(pe.KINDS))
    ap.add_argument("--points", nargs="+", metavar="D:N:R:REL",
                    default=["64:4096:4,16:1e-2,1e-3,1e-4", "256:2048:8,64:1e-2,1e-3,1e-4",
                             "1024:512:8,64:1e-3,1e-4"],
                    help="comma lists, their product (as precision_exp.py --points)")
    ap.add_argument("--p", nargs="+", type=float, default=[0.05, 0.1])
    ap.add_argument("--scale", type=float, default=2.0, help="s = alpha/r (a power of two)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    kinds = [pe.KINDS[k] for k in args.kinds]
    points = [pt for spec in args.points for pt in pe.parse_points(spec)]
    args.out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "experiments/dropout_precision_exp.py", *argv])
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, (point, p) in enumerate((pt, p) for p in args.p for pt in points):
        rows += run_point(point, p, kinds, args.scale, args.seed)
        bad = [f"{r['kind']}/{r['variant']}" for r in rows[-len(kinds) * (1 + len(PLANS)):]
               if not r["pass"]]
        print(f"[{i + 1}/{len(points) * len(args.p)} {time.perf_counter() - start:5.0f}s] "
              f"p={p} {pe.where(rows[-1])} fails: {' '.join(bad) or '-'}", flush=True)
    pe.write_points(args.out / "dropout_precision_points.csv", rows)
    text = pe.summary(rows, command, time.perf_counter() - start,
                      title="Precision of sparse dropout in 16 bits vs PEFT's own path, same mask")
    (args.out / "dropout_precision_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
