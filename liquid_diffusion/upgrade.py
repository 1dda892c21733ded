"""Reading what earlier architecture versions saved: version 5's and 6's weights and version 6's optimizer state.

Version 7 computes version 6's function; only the layout of the t-dependent maps changed: each block's five linear
maps of t_emb (and its cell's ``rho``) are stacked into the one ``BlockModulation`` (``blocks.py``). The functions
here copy the numbers into the new places; ``model.py`` calls ``upgrade_state_dict`` whenever weights load
(``from_pretrained``, ``load_state_dict``), ``checkpoints.restore_training_state`` upgrades a version-6 run's
optimizer state too. The model is passed in (its ``block_names()`` and ``modulation.kinds``), never imported.
"""

from __future__ import annotations

import torch

# Where version 5/6 kept each of BlockModulation's kinds: (linear map in the block, which of its chunks, chunks)
_VERSION_6_SOURCES = {
    "scale_mix": ("norm_mix.modulation", 0, 2), "shift_mix": ("norm_mix.modulation", 1, 2),
    "time_a": ("cfc.time_ab", 0, 2), "time_b": ("cfc.time_ab", 1, 2), "tau": ("cfc.time_tau", 0, 1),
    "gate": ("cfc.gate", 0, 1),
    "scale_ff": ("norm_ff.modulation", 0, 2), "shift_ff": ("norm_ff.modulation", 1, 2), "gate_ff": ("ff_gate", 0, 1),
}


def upgrade_state_dict(state_dict: dict, block_names: list[str], kinds: tuple[str, ...], prefix: str = "") -> None:
    """Rewrites version-5/6 weights in place as version 7's: each block's five t_emb linear maps (and its cell's
    ``rho``), stacked in ``BlockModulation``'s layout, kind by kind and block by block in the order they run. The
    numbers are copied, not changed; a state dict without those maps (version 7) is left as it is."""
    if not block_names or f"{prefix}{block_names[0]}.norm_mix.modulation.weight" not in state_dict:
        return
    stacked = {}
    for part in ("weight", "bias"):
        rows = []
        for kind in kinds:
            linear, index, chunks = _VERSION_6_SOURCES[kind]
            rows += [state_dict[f"{prefix}{name}.{linear}.{part}"].chunk(chunks)[index] for name in block_names]
        stacked[f"{prefix}modulation.linear.{part}"] = torch.cat(rows)
    if "tau" in kinds:
        stacked[f"{prefix}modulation.rho"] = torch.cat([state_dict[f"{prefix}{name}.cfc.rho"] for name in block_names])
    old = {f"{prefix}{name}.{linear}.{part}" for name in block_names for linear, _, _ in _VERSION_6_SOURCES.values()
           for part in ("weight", "bias")} | {f"{prefix}{name}.cfc.rho" for name in block_names}
    for key in old & set(state_dict):
        del state_dict[key]
    state_dict.update(stacked)


# The parameters of a version-5/6 block in the order version 6 registered them (a module's own parameters before its
# children's: the cell's rho before its heads). Optimizer state is saved in parameter order, without names.
_VERSION_6_BLOCK_PARAMETERS = {
    liquid: ("norm_mix.modulation.weight", "norm_mix.modulation.bias", "mix.w_in.weight", "mix.w_in.bias",
             "mix.depthwise.weight", "mix.depthwise.bias", "mix.channel_gate.weight", "mix.channel_gate.bias",
             *(("cfc.rho", "cfc.heads.weight", "cfc.heads.bias", "cfc.time_ab.weight", "cfc.time_ab.bias",
                "cfc.time_tau.weight", "cfc.time_tau.bias") if liquid else
               ("cfc.w_out.weight", "cfc.w_out.bias", "cfc.gate.weight", "cfc.gate.bias")),
             "norm_ff.modulation.weight", "norm_ff.modulation.bias", "ff.net.0.weight", "ff.net.0.bias",
             "ff.net.2.weight", "ff.net.2.bias", "ff_gate.weight", "ff_gate.bias")
    for liquid in (True, False)
}


def version_6_parameter_names(model) -> list[str]:
    """The parameter names of the version-6 model that ``model`` (version 7) upgrades, in version 6's order."""
    blocks, seen, names = set(model.block_names()), set(), []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        block = ".".join(parts[:2] if parts[0] == "bottleneck" else parts[:3])
        if block in blocks:
            if block not in seen:  # a block's version-6 parameters stand where its first parameter does
                seen.add(block)
                names += [f"{block}.{p}" for p in _VERSION_6_BLOCK_PARAMETERS[model.config.liquid]]
        elif not name.startswith("modulation."):
            names.append(name)
    return names


def upgrade_optimizer_state(state: dict, model) -> dict:
    """A version-6 run's optimizer state dict (AdamW's per-parameter moments, in version 6's parameter order) as
    version 7's: the moments of the stacked maps stacked as the maps are (``upgrade_state_dict``). AdamW is
    elementwise, so training continues with the same steps it would have taken."""
    old_names, (group,) = version_6_parameter_names(model), state["param_groups"]
    if len(group["params"]) != len(old_names):
        raise ValueError(f"its optimizer state holds {len(group['params'])} parameters, version 6's model "
                         f"{len(old_names)}")
    old = {name: state["state"][index] for name, index in zip(old_names, group["params"]) if index in state["state"]}
    new_names = [name for name, _ in model.named_parameters()]
    upgraded = {}
    if old:
        moments = {key for entry in old.values() for key in entry if key != "step"}
        for key in moments:
            by_name = {name: entry[key] for name, entry in old.items()}
            upgrade_state_dict(by_name, model.block_names(), model.modulation.kinds)
            for name, value in by_name.items():
                upgraded.setdefault(name, {})[key] = value
        step = next(iter(old.values()))["step"]
        upgraded = {name: {"step": step.clone() if torch.is_tensor(step) else step, **upgraded[name]}
                    for name in new_names}
    return {"state": {i: upgraded[name] for i, name in enumerate(new_names) if name in upgraded},
            "param_groups": [{**group, "params": list(range(len(new_names)))}]}
