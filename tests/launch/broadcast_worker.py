"""One process of tests/launch/test_broadcast_loading.py (run by torchrun, 2 processes over gloo).

Loads ``<folder>`` as a causal LM and as a one-label sequence classifier inside ``models.broadcast_loading``,
shards each with FSDP2 and fills it from rank 0 (``models.load_from_rank0``), then writes what this process
saw into ``<out>/rank<N>.json``: the parameters it held right after loading, whether tied weights stayed one
parameter, and how far the sharded model's outputs are from the same checkpoint loaded whole."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from rlhf_exp.models import broadcast_loading, from_pretrained, load_from_rank0


def main(folder: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    hardware = SimpleNamespace(distributed="fsdp", load_in_4bit=False, load_in_8bit=False)
    report = {}
    ids = torch.tensor([[3, 5, 7, 11, 13, 2]])
    for name, cls, extra in (("causal_lm", AutoModelForCausalLM, {}),
                             ("classifier", AutoModelForSequenceClassification, {"num_labels": 1})):
        torch.manual_seed(0)  # the classifier's new head: drawn on rank 0 only, broadcast to the others
        with broadcast_loading(hardware):
            model = from_pretrained(cls, folder, name, dtype=torch.float32, **extra)
        held = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
        whole = model.state_dict() if rank == 0 else None
        # the head rank 0 drew when it loaded (the classifier's is new), to compare with below
        head = model.get_output_embeddings() if name == "causal_lm" else model.score
        drawn = head.weight.detach().clone() if rank == 0 else torch.empty(head.weight.shape)
        for module in model.modules():
            if type(module).__name__ in model._no_split_modules:
                fully_shard(module)
        fully_shard(model)
        load_from_rank0(model, whole, torch.device("cpu"))
        reference = cls.from_pretrained(folder, dtype=torch.float32, **extra)
        if name == "classifier":
            dist.broadcast(drawn, src=0)
            reference.score.weight.data.copy_(drawn)
        with torch.no_grad():
            got = model(ids).logits
            want = reference(ids).logits
        tied = getattr(model.config, "tie_word_embeddings", False) and name == "causal_lm"
        # what a rollout engine is given (rlhf_exp.ppo.engines.whole_parameters): the whole weights, one at a time
        from rlhf_exp.ppo.engines import whole_parameters

        expected = dict(reference.named_parameters())
        gathered = {n: (t.shape == expected[n].shape and torch.equal(t, expected[n].detach())) if n in expected else None
                    for n, t in whole_parameters(model, torch.device("cpu"))}
        report[name] = {
            "held_after_loading": held,
            "total": sum(p.numel() for p in reference.parameters()),
            "max_abs_diff": (got - want).abs().max().item(),
            "tied_still_one": (model.get_output_embeddings().weight is model.get_input_embeddings().weight) if tied else None,
            "whole_parameters_equal": sorted(n for n, ok in gathered.items() if ok) == sorted(expected),
            "rotary_inv_freq_finite": all(torch.isfinite(b).all().item() for n, b in model.named_buffers()),
        }
    report["accelerate"] = through_accelerate(folder, hardware, rank, ids)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def through_accelerate(folder: str, hardware, rank: int, ids) -> dict:
    """The TRL phases' path on GPUs: the skeleton goes to accelerate's own FSDP2 preparation
    (``fsdp2_prepare_model`` with ``cpu_ram_efficient_loading``, which broadcasts rank 0's weights), called here
    directly because accelerate turns its FSDP plugin on for GPU process groups only."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import AutoModelForCausalLM

    with broadcast_loading(hardware):
        model = from_pretrained(AutoModelForCausalLM, folder, "policy", dtype=torch.float32)
    held = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, cpu_ram_efficient_loading=True,
                                            auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, is_main_process=rank == 0, mixed_precision="no",
                                  device=torch.device("cpu"))
    model = fsdp2_prepare_model(accelerator, model)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    return {"held_after_loading": held, "total": sum(p.numel() for p in reference.parameters()),
            "max_abs_diff": diff, "tied_still_one": None, "rotary_inv_freq_finite": True}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
