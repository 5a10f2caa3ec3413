"""The demo model in the original HF checkpoint layout (bf16 safetensors shards + index),
read back, checked against transformers' Step3p7TextModel, and converted as the bundled demo is."""

import json
import os

import torch
import torch.nn.functional as F

DEMO_GROUP_SIZE = 32  # o_proj (6 heads x 32) and the experts' down_proj (64) split in 2 whole groups


def hf_state_dict(model):
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("inv_freq"):
            continue
        if k.endswith((".moe.gate_proj", ".moe.up_proj", ".moe.down_proj")):
            k = k + ".weight"
        v = v.detach().clone().contiguous()
        sd[k] = v.float() if k.endswith("router_bias") else v.to(torch.bfloat16)
    return sd


def load_hf_state_dict(model, sd):
    own = {}
    for k, v in sd.items():
        if k.endswith((".moe.gate_proj.weight", ".moe.up_proj.weight", ".moe.down_proj.weight")):
            k = k[: -len(".weight")]
        own[k] = v.float()
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    assert not missing and not unexpected, (missing, unexpected)


def export(model, cfg, out_dir):
    from safetensors.torch import save_file

    sd = hf_state_dict(model)
    n = cfg["num_hidden_layers"]

    def is_mtp(key):
        parts = key.split(".")
        return key.startswith("model.layers.") and int(parts[2]) >= n

    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if not is_mtp(k)},
        "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if is_mtp(k)},
    }
    weight_map, total = {}, 0
    for fname, part in shards.items():
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    json.dump(index, open(os.path.join(out_dir, "model.safetensors.index.json"), "w"), indent=2)
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    return sd


def read_export(out_dir):
    from safetensors.torch import load_file

    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    sd = {}
    for fname in sorted(set(index["weight_map"].values())):
        sd.update(load_file(os.path.join(out_dir, fname)))
    assert set(sd) == set(index["weight_map"])
    return sd


def hf_trunk_logits(out_dir, sd, ids):
    """Logits of transformers' Step3p7TextModel (+ lm_head) on the exported weights."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    raw = json.load(open(os.path.join(out_dir, "config.json")))
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hcfg = Step3p7TextConfig(**raw)
    hcfg._attn_implementation = "eager"
    hf = Step3p7TextModel(hcfg).float().eval()
    n = raw["num_hidden_layers"]
    target = {}
    for k, v in sd.items():
        if not k.startswith("model."):
            continue
        k2 = k[len("model.") :]
        if k2.startswith("layers.") and int(k2.split(".")[1]) >= n:
            continue
        k2 = (
            k2.replace(".moe.gate.weight", ".mlp.gate.weight")
            .replace(".moe.router_bias", ".mlp.gate.e_score_correction_bias")
            .replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
            .replace(".share_expert.", ".mlp.shared_experts.")
        )
        if k2.endswith(".moe.up_proj.weight"):
            continue
        if k2.endswith(".moe.gate_proj.weight"):
            up = sd[k.replace("gate_proj", "up_proj")]
            k2 = k2.replace(".moe.gate_proj.weight", ".mlp.experts.gate_up_proj")
            v = torch.cat((v, up), dim=1)
        target[k2] = v.float()
    hsd = hf.state_dict()
    missing = set(hsd) - set(target)
    extra = set(target) - set(hsd)
    assert not missing and not extra, (sorted(missing)[:10], sorted(extra)[:10])
    for k in hsd:
        assert hsd[k].shape == target[k].shape, (k, hsd[k].shape, target[k].shape)
    hf.load_state_dict(target, strict=True)
    with torch.no_grad():
        h = hf(input_ids=ids).last_hidden_state
        return F.linear(h, sd["lm_head.weight"].float())


def convert_demo(hf_dir, mlx_dir, log):
    """The bundled demo's conversion of the export, with the training log beside it."""
    from mlx_step35 import convert

    convert(hf_dir, mlx_dir, quantize=True, q_group_size=DEMO_GROUP_SIZE)
    log = dict(
        log,
        conversion=f"python convert.py --hf-path {hf_dir} --mlx-path {mlx_dir} -q --q-group-size {DEMO_GROUP_SIZE}",
    )
    json.dump(log, open(os.path.join(mlx_dir, "train_log.json"), "w"), indent=2)
    print(f"converted to {mlx_dir} (4-bit, groups of {DEMO_GROUP_SIZE})")
