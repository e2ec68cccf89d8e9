"""Serving many TeRA adapters: one mixed-adapter batch against its alternatives.

    python -m bench.serving --smoke          # tiny sizes, a few seconds: checks that everything runs
    python -m bench.serving --out DIR        # the measurement (B = 64 rows, A = 1, 8, 64, 1024)
    python -m bench.serving --diag mode --order 3 --hidden 1024 --layers 2 --seq 16 --adapters 64
                                             # the library's defaults (mode side) at one point

A tiny Llama built from a config (no download) carries TeRA on q/v/down projections. A batch of
``B`` rows, each drawn from ``A`` adapters held in an :class:`tera_tn.peft.AdapterStore` (every row
a different adapter where ``A >= B``), runs, inference only, as:

* ``tera_mixed``: one forward with ``adapter_names=`` (per-row λ through one contraction);
* ``tera_loop``: one single-adapter forward per distinct adapter of the batch, each preceded by
  copying that adapter's λ into the model's adapter (a hot swap), on its rows only;
* ``tera_single``: the whole batch with one unmerged adapter (no ``adapter_names``);
* ``tera_merged``: the whole batch with one adapter merged into the base weights;
* ``lora_mixed`` (at ``A = 64`` only): PEFT LoRA r=8 with 64 adapters, PEFT's own mixed batch;
* ``base``: the model without adapters.

Timing: contenders alternate in rounds after a warm-up, each summarized by its median (ratios of
medians are the reported quantities). Memory per adapter: the store's bytes over ``A`` for TeRA,
the parameter bytes of one adapter for LoRA. ``tera_mixed`` is also checked against
``tera_loop`` (largest absolute logit difference). Writes ``serving.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tera_tn.peft import AdapterStore, TeraConfig  # noqa: E402

#: the adapted projections by default; ``--targets all`` adapts the seven of a Llama block
TARGETS = ("q_proj", "v_proj", "down_proj")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ServingConfig:
    hidden: int = 512
    layers: int = 4
    seq: int = 32
    batch: int = 64
    adapters: tuple[int, ...] = (1, 8, 64, 1024)
    lora_adapters: int = 64
    order: int = 4
    #: rank side: what the published serving figures were measured with
    diag: str = "rank"
    #: ``"full"`` or a fraction of each mode's size (``TeRASpec.from_shape``'s ``ranks``)
    ranks: str | float = "full"
    targets: tuple[str, ...] = TARGETS
    rounds: int = 7
    seed: int = 0


SMOKE = ServingConfig(hidden=32, layers=1, seq=4, batch=4, adapters=(1, 2, 8), lora_adapters=2, rounds=1)


def build_base(cfg: ServingConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(64, cfg.seq),
    )
    return LlamaForCausalLM(config).eval()


def _tera_layers(model, adapter: str):
    return [m for m in model.modules() if hasattr(m, "tera_lambda") and adapter in m.tera_lambda]


def fill_store(model, store: AdapterStore, count: int, gen: torch.Generator) -> None:
    """Adapters ``u{len(store)}``… of random λ up to ``count`` stored, written through "default"."""
    layers = _tera_layers(model, "default")
    for i in range(len(store), count):
        for layer in layers:
            lam = layer.tera_lambda["default"]
            lam.data.copy_(torch.randn(lam.shape, generator=gen) * 0.1)
        store.add(f"u{i}", adapter="default")


def timed(fns: dict, rounds: int) -> dict:
    """``{name: [seconds per call]}``, contenders alternating, the order rotating each round."""
    names = list(fns)
    for n in names:
        fns[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def run(cfg: ServingConfig, log=print) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    tokens = torch.randint(0, 256, (cfg.batch, cfg.seq), generator=gen)
    tera_cfg = TeraConfig(target_modules=list(cfg.targets), order=cfg.order, diag=cfg.diag, ranks=cfg.ranks,
                          seed=cfg.seed, scale_init="random")
    model = get_peft_model(build_base(cfg), tera_cfg, adapter_name="default").eval()
    store = AdapterStore(model)
    layers = _tera_layers(model, "default")
    results = {"config": asdict(cfg), "points": {}}
    # (store, column offset, spec, bank) of each layer: where a hot swap reads an adapter's λ.
    slots = [layer._tera_store_slot for layer in layers]
    for a in cfg.adapters:
        fill_store(model, store, a, gen)
        if a >= cfg.batch:
            picks = torch.randperm(a, generator=gen)[: cfg.batch].tolist()
        else:
            picks = torch.randint(0, a, (cfg.batch,), generator=gen).tolist()
        names = [f"u{i}" for i in picks]

        def mixed():
            with torch.no_grad():
                return model(tokens, adapter_names=names).logits

        def loop():
            out = torch.empty(cfg.batch, cfg.seq, model.config.vocab_size)
            with torch.no_grad():
                for name in dict.fromkeys(names):
                    rows = [i for i, n in enumerate(names) if n == name]
                    r = store._rows_of[name]
                    for layer, (_, off, spec, _) in zip(layers, slots):
                        layer.tera_lambda["default"].data.copy_(store._table[r, off : off + spec.num_trainable])
                    out[rows] = model(tokens[rows]).logits
            return out

        def single():
            with torch.no_grad():
                return model(tokens).logits

        def base():
            with torch.no_grad(), model.disable_adapter():
                return model(tokens).logits

        diff = float((mixed() - loop()).abs().max())
        fns = {"tera_mixed": mixed, "tera_loop": loop, "tera_single": single, "base": base}
        times = timed(fns, cfg.rounds)
        model.merge_adapter()
        try:
            times["tera_merged"] = timed({"m": single}, cfg.rounds)["m"]
        finally:
            model.unmerge_adapter()
        point = {
            "adapters": a,
            "distinct_in_batch": len(set(names)),
            "mixed_vs_loop_max_abs_diff": diff,
            "store_bytes_per_adapter": store.nbytes / a,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "times_s": times,
        }
        if a == cfg.lora_adapters:
            point["median_s"]["lora_mixed"], point["lora_bytes_per_adapter"] = lora_mixed(cfg, tokens, gen)
        results["points"][str(a)] = point
        log(f"A={a}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in point["median_s"].items()))
    results["lambda_numbers_per_adapter"] = sum(slot[2].num_trainable for slot in slots)
    return results


def lora_mixed(cfg: ServingConfig, tokens: torch.Tensor, gen: torch.Generator) -> tuple[float, int]:
    """Median of PEFT LoRA r=8's own mixed batch over ``cfg.lora_adapters`` adapters, and the bytes of one."""
    lcfg = dict(r=8, target_modules=list(cfg.targets), init_lora_weights=False)
    model = get_peft_model(build_base(cfg), LoraConfig(**lcfg), adapter_name="l0")
    for i in range(1, cfg.lora_adapters):
        model.add_adapter(f"l{i}", LoraConfig(**lcfg))
    model.eval()
    picks = torch.randint(0, cfg.lora_adapters, (cfg.batch,), generator=gen).tolist()
    if cfg.lora_adapters >= cfg.batch:
        picks = torch.randperm(cfg.lora_adapters, generator=gen)[: cfg.batch].tolist()
    names = [f"l{i}" for i in picks]

    def step():
        with torch.no_grad():
            return model(tokens, adapter_names=names).logits

    per_adapter = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith(".l0.weight"))
    return statistics.median(timed({"l": step}, cfg.rounds)["l"]), per_adapter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that everything runs")
    ap.add_argument("--out", default="bench-serving", help="folder for serving.json (default: %(default)s)")
    default = ServingConfig()
    for field in ("hidden", "layers", "seq", "batch", "order", "rounds"):
        ap.add_argument(f"--{field}", type=int, default=getattr(default, field), help="default: %(default)s")
    ap.add_argument("--adapters", default=",".join(map(str, default.adapters)),
                    help="comma-separated adapter counts A (default: %(default)s)")
    ap.add_argument("--diag", default=default.diag, choices=("rank", "mode", "both"), help="default: %(default)s")
    ap.add_argument("--ranks", default="full", help="'full' or a fraction in (0, 1] (default: %(default)s)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated projections, or 'all' for the seven of a Llama block (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.smoke:
        cfg = SMOKE
    else:
        adapters = tuple(int(a) for a in args.adapters.split(","))
        cfg = ServingConfig(hidden=args.hidden, layers=args.layers, seq=args.seq, batch=args.batch, adapters=adapters,
                            lora_adapters=default.lora_adapters if default.lora_adapters in adapters else adapters[-1],
                            order=args.order, diag=args.diag, rounds=args.rounds,
                            ranks=args.ranks if args.ranks == "full" else float(args.ranks),
                            targets=ALL_PROJECTIONS if args.targets == "all" else tuple(args.targets.split(",")))
    results = run(cfg)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "serving.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"λ numbers per adapter: {results['lambda_numbers_per_adapter']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
