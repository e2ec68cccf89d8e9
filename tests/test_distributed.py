"""Scale-out training with TeRA: DDP, FSDP2, traffic per step, gradient checkpointing.

One pair of gloo processes (this file run as a script) does every multi-process check, so the
cost of starting them and importing transformers is paid once; the pytest tests then read its
JSON report. Each rank:

* trains a plain-torch model (``add_tera``) under DDP and counts the bytes DDP sends per step;
* counts the bytes per step for TeRA, LoRA r=8 and VeRA r=256 through PEFT on the same model;
* trains a tiny BERT with TeRA through PEFT under DDP and under FSDP2 (``fully_shard``) on the
  same data, and saves the adapter of each (rank 0 only);
* rank 0 replays both trainings in one process on the concatenated batch (the reference).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 3


# --- worker (runs in the spawned processes) -----------------------------------------------------


class _Traffic:
    """Bytes DDP sends: gradient buckets (a comm hook) and buffer broadcasts (``_broadcast_coalesced``)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.grads = 0
        self.broadcasts = 0
        original = dist._broadcast_coalesced

        def counting(group, tensors, *args, **kwargs):
            self.broadcasts += sum(t.numel() * t.element_size() for t in tensors)
            return original(group, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        self.grads += buf.numel() * buf.element_size()
        return allreduce_hook(state, bucket)

    def reset(self) -> None:
        self.grads = self.broadcasts = 0


def _ddp(model, traffic):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    ddp.register_comm_hook(None, traffic.hook)
    traffic.reset()  # the one-off broadcast of the initial state is not a per-step cost
    return ddp


def _sgd_steps(model, batches, loss_fn, lr):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _gather(t):
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return out


def _rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _mlp_batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    return [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(STEPS)]


def _mlp_tera():
    from torch import nn

    from tera_tn.torch import TeRALayersConfig, add_tera

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    add_tera(model, TeRALayersConfig(target_modules=["0", "2"], order=4, seed=1234, alpha=4.0))
    return model


def _mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _torch_lambdas(model):
    from tera_tn.torch import tera_layers

    return [p.detach().clone() for _, layer in tera_layers(model) for p in layer.scales()]


def _plain_torch(rank: int) -> dict:
    from tera_tn.torch import tera_layers

    model = _mlp_tera()
    bank = next(iter(tera_layers(model)))[1].tera_bank
    digest = bank.fingerprint()
    lam_init = _torch_lambdas(model)
    traffic = _Traffic()
    ddp = _ddp(model, traffic)
    losses = _sgd_steps(ddp, _mlp_batches(rank), _mse, lr=0.1)
    lam_final = _torch_lambdas(model)
    lam = torch.cat([p.flatten() for p in lam_final])
    lams = _gather(lam)
    digests = _gather(torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8))
    out = {
        "broadcast_buffers": len(ddp.modules_buffers),
        "grad_bytes_per_step": traffic.grads / STEPS,
        "broadcast_bytes_per_step": traffic.broadcasts / STEPS,
        "lambda_bytes": lam.numel() * 4,
        "factors_identical": all(d.equal(digests[0]) for d in digests),
        "digest_unchanged": bank.fingerprint() == digest,
        "lambda_rank_max_diff": max(float((t - lams[0]).abs().max()) for t in lams),
        "lambda_moved": [not torch.equal(a, b) for a, b in zip(lam_init, lam_final)],
        "losses": losses,
    }
    if rank == 0:
        ref = _mlp_tera()
        both = [_mlp_batches(r) for r in range(WORLD)]
        joined = [tuple(torch.cat(parts) for parts in zip(*(b[s] for b in both))) for s in range(STEPS)]
        _sgd_steps(ref, joined, _mse, lr=0.1)
        out["lambda_vs_single_rel"] = _rel_diff(lam, torch.cat([p.flatten() for p in _torch_lambdas(ref)]))
    return out


def _two_layers():
    from torch import nn

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(384, 384), nn.Linear(384, 384)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    return TwoLayers()


def _bytes_per_method() -> dict:
    """Everything DDP sends per step for three PEFT methods on the same two 384×384 layers."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    from tera_tn.peft import TeraConfig

    configs = {
        "tera": TeraConfig(target_modules=["a", "b"], order=4, seed=0),
        "lora_r8": LoraConfig(r=8, target_modules=["a", "b"]),
        "vera_r256": VeraConfig(r=256, target_modules=["a", "b"]),
    }
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = get_peft_model(_two_layers(), config)
        traffic = _Traffic()
        ddp = _ddp(model, traffic)
        gen = torch.Generator().manual_seed(7)
        batches = [(torch.randn(4, 384, generator=gen), torch.randn(4, 384, generator=gen)) for _ in range(2)]
        # VeRA's and LoRA's B start at zero and TeRA starts at ΔW = 0, so the first step's
        # gradients flow through every trainable tensor alike.
        _sgd_steps(ddp, batches, _mse, lr=0.01)
        out[name] = {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "broadcast_buffers": len(ddp.modules_buffers),
            "grad_bytes_per_step": traffic.grads / 2,
            "broadcast_bytes_per_step": traffic.broadcasts / 2,
        }
    return out


def _bert():
    import transformers
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    base = transformers.BertForSequenceClassification(cfg)
    return get_peft_model(base, TeraConfig(target_modules=["query", "value", "dense"], order=4, seed=5, scale_init="random"))


def _bert_batches(rank):
    gen = torch.Generator().manual_seed(200 + rank)
    return [(torch.randint(0, 64, (4, 9), generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(STEPS)]


def _cross_entropy(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def _peft_lambdas(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _flat(lams: dict):
    return torch.cat([lams[k].flatten() for k in sorted(lams)])


def _bert_ddp(rank: int, out: Path) -> dict:
    from tera_tn.peft import save_adapter

    model = _bert()
    traffic = _Traffic()
    ddp = _ddp(model, traffic)
    _sgd_steps(ddp, _bert_batches(rank), _cross_entropy, lr=0.5)
    lam = _flat(_peft_lambdas(model))
    lams = _gather(lam)
    if rank == 0:
        save_adapter(model, out / "ddp")
    base_buffers = sum(b.numel() * b.element_size() for b in ddp.modules_buffers)
    result = {
        "lambda": lam.tolist(),
        "lambda_rank_max_diff": max(float((t - lams[0]).abs().max()) for t in lams),
        "grad_bytes_per_step": traffic.grads / STEPS,
        "lambda_bytes": lam.numel() * 4,
        # BERT's own position/token-type id buffers: DDP broadcasts them whatever the adapter.
        "broadcast_bytes_per_step": traffic.broadcasts / STEPS,
        "base_buffer_bytes": base_buffers,
        "broadcast_buffer_names": [n for n, _ in model.named_buffers()],
    }
    if rank == 0:
        ref = _bert()
        both = [_bert_batches(r) for r in range(WORLD)]
        joined = [tuple(torch.cat(parts) for parts in zip(*(b[s] for b in both))) for s in range(STEPS)]
        _sgd_steps(ref, joined, _cross_entropy, lr=0.5)
        result["lambda_vs_single_rel"] = _rel_diff(lam, _flat(_peft_lambdas(ref)))
    return result


def _bert_fsdp(rank: int, out: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from tera_tn.peft import save_adapter

    model = _bert()
    for block in model.base_model.model.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)
    layers = [m for m in model.modules() if hasattr(m, "tera_bank") and "default" in getattr(m, "tera_bank", {})]
    banks = {id(m.tera_bank["default"]) for m in layers}
    bank = layers[0].tera_bank["default"]
    factors = list(bank.iter_factors())
    _sgd_steps(model, _bert_batches(rank), _cross_entropy, lr=0.5)
    sharded = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full = {n: p.full_tensor().detach() for n, p in sharded.items()}
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    if rank == 0:
        save_adapter(model, out / "fsdp", state_dict=state)
    wrote_plain_save = None
    try:
        model.save_pretrained(str(out / f"plain-save-{rank}"))
    except (TypeError, ValueError) as e:
        wrote_plain_save = str(e)
    return {
        "lambda": _flat(full).tolist(),
        "lambda_sharded": all(isinstance(p, DTensor) for p in sharded.values()),
        "banks": len(banks),
        "layers": len(layers),
        "factors_plain": all(type(t) is torch.Tensor for t in factors),
        "factor_ptrs_unique": len({t.data_ptr() for t in factors}) == len(factors),
        "factors_in_state": [n for n in model.state_dict() if "tera_bank" in n],
        "factor_buffers": [n for n, _ in model.named_buffers() if "tera_bank" in n],
        "gathered_keys": sorted(state),
        "trainable_keys": sorted(sharded),
        "plain_save_error": wrote_plain_save,
    }


def _worker(rank: int, port: int, out: Path) -> dict:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result = {
        "rank": rank,
        "torch": _plain_torch(rank),
        "bytes": _bytes_per_method(),
        "bert_ddp": _bert_ddp(rank, out),
        "bert_fsdp": _bert_fsdp(rank, out),
    }
    dist.destroy_process_group()
    return result


# --- launcher and tests ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for rank in range(WORLD)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-4000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results, out


def test_ddp_plain_torch_sends_only_lambda_gradients_and_matches_one_process(ranks):
    results, _ = ranks
    r0, r1 = (r["torch"] for r in results)
    for r in (r0, r1):
        # Nothing to broadcast: the factors are not buffers; only λ's gradients are all-reduced.
        assert r["broadcast_buffers"] == 0 and r["broadcast_bytes_per_step"] == 0
        assert r["grad_bytes_per_step"] == r["lambda_bytes"]
        assert r["factors_identical"] and r["digest_unchanged"]
        assert r["lambda_rank_max_diff"] == 0.0
        # Zero-start sets every λ but one per layer to 1: each λ_n must have left its start.
        assert all(r["lambda_moved"]), r["lambda_moved"]
    assert r0["losses"] != r1["losses"]  # the ranks really saw different data
    assert r0["lambda_vs_single_rel"] <= 1e-6


def test_bytes_per_step_tera_lora_vera(ranks):
    results, _ = ranks
    b = results[0]["bytes"]
    tera, lora, vera = b["tera"], b["lora_r8"], b["vera_r256"]
    assert tera["broadcast_buffers"] == 0 and tera["broadcast_bytes_per_step"] == 0
    assert tera["grad_bytes_per_step"] == 4 * tera["trainable"]
    assert lora["grad_bytes_per_step"] == 4 * lora["trainable"] and lora["broadcast_bytes_per_step"] == 0
    # VeRA keeps its shared projections as buffers: DDP re-sends them every step. This also
    # shows that the counter sees buffer broadcasts.
    assert vera["broadcast_buffers"] == 2 and vera["broadcast_bytes_per_step"] > 100 * vera["grad_bytes_per_step"]
    assert tera["grad_bytes_per_step"] < lora["grad_bytes_per_step"] / 50


def test_ddp_peft_bert_identical_across_ranks_and_matches_one_process(ranks):
    results, _ = ranks
    r0, r1 = (r["bert_ddp"] for r in results)
    assert r0["lambda"] == r1["lambda"] and r0["lambda_rank_max_diff"] == 0.0
    assert r0["lambda_vs_single_rel"] <= 1e-6
    assert r0["grad_bytes_per_step"] == r0["lambda_bytes"]
    # The only broadcast is BERT's own id buffers, which DDP sends for any adapter.
    assert r0["broadcast_bytes_per_step"] == r0["base_buffer_bytes"]
    assert not any("tera" in n for n in r0["broadcast_buffer_names"])


def test_fsdp2_keeps_factors_whole_and_matches_ddp(ranks):
    results, out = ranks
    for r in results:
        f = r["bert_fsdp"]
        assert f["lambda_sharded"]
        # One bank for all 11 layers, plain tensors (not DTensors), each stored once.
        assert f["layers"] == 11 and f["banks"] == 1 and f["factors_plain"] and f["factor_ptrs_unique"]
        assert f["factors_in_state"] == [] and f["factor_buffers"] == []
        # Only λ are gathered (frozen weights are skipped), and only rank 0 receives them.
        expected = f["trainable_keys"] if r["rank"] == 0 else []
        assert f["gathered_keys"] == expected and all("tera_lambda" in k for k in f["trainable_keys"])
        assert f["lambda"] == r["bert_ddp"]["lambda"]
        assert "sharded" in f["plain_save_error"] and "get_model_state_dict" in f["plain_save_error"]
    assert results[0]["bert_fsdp"]["lambda"] == results[1]["bert_fsdp"]["lambda"]
    # Rank 0 alone wrote each adapter; FSDP's is the DDP one byte for byte.
    assert sorted(p.name for p in (out / "fsdp").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ddp_bytes = (out / "ddp" / "adapter_model.safetensors").read_bytes()
    assert (out / "fsdp" / "adapter_model.safetensors").read_bytes() == ddp_bytes
    assert not any((out / f"plain-save-{r}" / "adapter_model.safetensors").exists() for r in range(WORLD))


# --- in-process: a model split by accelerate, gradient checkpointing, bf16 autocast ----------------


def _two_block_peft():
    from peft import get_peft_model
    from torch import nn

    from tera_tn.peft import TeraConfig

    class TwoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    return get_peft_model(TwoBlocks(), TeraConfig(target_modules=["a", "b"], order=4, scale_init="random"))


def test_accelerate_offloaded_block_gives_the_same_outputs(tmp_path):
    """Block b offloaded (its weights and λ on meta, restored by accelerate's hooks at forward)."""
    import copy

    accelerate = pytest.importorskip("accelerate")
    model = _two_block_peft()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    inner = copy.deepcopy(model.base_model.model)
    layer_cls = type(inner.b).__name__
    accelerate.dispatch_model(
        inner, device_map={"a": "cpu", "b": "disk"}, main_device="cpu", offload_dir=str(tmp_path / "off"),
        preload_module_classes=[layer_cls],
    )
    assert inner.b.base_layer.weight.is_meta and inner.b.tera_lambda["default"].is_meta
    assert inner.a.tera_lambda["default"].device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(inner(x), ref)
    # Without preloading, accelerate never restores λ (the ParameterDict is not called): a clear error.
    bare = copy.deepcopy(model.base_model.model)
    accelerate.dispatch_model(bare, device_map={"a": "cpu", "b": "disk"}, main_device="cpu", offload_dir=str(tmp_path / "off2"))
    with pytest.raises(RuntimeError, match=f"preload_module_classes=\\['{layer_cls}'\\]"):
        bare(x)


def _tiny_bert_peft(**cfg):
    import transformers
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    base = transformers.BertModel(config, add_pooling_layer=False)
    return get_peft_model(base, TeraConfig(target_modules=["query", "value", "dense"], order=4, scale_init="random", **cfg))


def _lambda_grads(model, *, checkpointing: bool, autocast: bool):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    readout = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(input_ids=ids).last_hidden_state
    (hidden.float() * readout).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_lambda_gradients():
    model = _tiny_bert_peft()
    plain = _lambda_grads(model, checkpointing=False, autocast=False)
    checkpointed = _lambda_grads(model, checkpointing=True, autocast=False)
    assert model.base_model.model.is_gradient_checkpointing
    assert plain.keys() == checkpointed.keys() and len(plain) == 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_gradients_match_fp32_with_and_without_checkpointing():
    model = _tiny_bert_peft()
    ref = _lambda_grads(model, checkpointing=False, autocast=False)
    bf16 = _lambda_grads(model, checkpointing=False, autocast=True)
    bf16_checkpointed = _lambda_grads(model, checkpointing=True, autocast=True)
    assert all(g.dtype == torch.float32 for g in bf16.values())  # λ stay fp32 master weights
    flat = lambda grads: torch.cat([grads[k].flatten() for k in sorted(grads)])  # noqa: E731
    # bf16 keeps 8 bits of mantissa: a few percent of the gradient's norm.
    assert (flat(bf16) - flat(ref)).norm() <= 0.05 * flat(ref).norm()
    torch.testing.assert_close(flat(bf16_checkpointed), flat(bf16), rtol=1e-3, atol=1e-5)


# --- accelerate launch of the Trainer example -------------------------------------------------------


def test_accelerate_trainer_example_two_processes(tmp_path):
    """Two CPU processes under accelerate: the loss goes down, rank 0 alone saves the adapter, and
    this (fresh) process reproduces the trained logits from it."""
    import importlib.util
    import shutil

    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate command is not installed next to this Python")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    script = ROOT / "examples" / "accelerate_trainer.py"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), "--smoke", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check = json.loads((tmp_path / "run" / "check.json").read_text())
    assert check["world_size"] == 2
    losses = check["losses"]
    assert min(losses[-2:]) < losses[0], losses
    assert not any("tera" in n for n in check["ddp_broadcast_buffers"])
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("adapter_model.safetensors")] == [Path("run/adapter_model.safetensors")]
    spec = importlib.util.spec_from_file_location("accelerate_trainer", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    reloaded = example.reload(tmp_path / "run")
    torch.testing.assert_close(example.logits(reloaded, example.probe()), torch.tensor(check["probe_logits"]), rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps(_worker(rank, port, out)))
