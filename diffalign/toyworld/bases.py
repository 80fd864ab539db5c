"""Toy base models as the studies use them: which folder to align (a shipped checkpoint, a pipeline folder or a
running pretrain's state), exporting a pretrain state, and a digest that keys cached evaluations.

Below the quickstart and the toy studies (`toyworld/ppd.py`), so neither imports the other for these."""

from __future__ import annotations

import dataclasses
import hashlib
import os


def _missing_checkpoint(family: str, where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no toy-{family} checkpoint at {where}. Build one with `python -m diffalign.toyworld.pretrain --family {family}` "
        f"(it writes diffalign/toyworld/checkpoints/toy-{family}; about 90 min on 2 CPU cores), or point --base at a toy "
        "pipeline folder (with model_index.json) or at a running pretrain's --state_dir (with state.pt)."
    )


def export_state(state_dir: str, out_root: str, family: str) -> str:
    """Write the EMA weights of a (possibly still running) pretrain run as a toy pipeline; returns its folder.

    Reuses an earlier export of the same step. The pretrain saves `state.pt` atomically, so reading it
    while the run goes on is safe.
    """
    import torch

    from diffalign.toyworld import pretrain as P

    state = torch.load(os.path.join(state_dir, "state.pt"), map_location="cpu", weights_only=True)
    if state.get("stage") != "denoiser":
        raise ValueError(f"{state_dir} is still in stage 1 (VAE training); wait for the denoiser stage to save a state")
    run_family = state.get("config", {}).get("family", family)
    if run_family != family:
        raise ValueError(f"{state_dir} holds a toy-{run_family} run, not toy-{family}; pass --family {run_family}")
    out = os.path.join(out_root, f"base-{family}-step{state['step']:07d}")
    if os.path.exists(os.path.join(out, "model_index.json")):
        return out
    known = {f.name for f in dataclasses.fields(P.PretrainConfig)} - {"output_dir", "state_dir", "family"}
    run_config = {k: v for k, v in state.get("config", {}).items() if k in known}
    cfg = P.PretrainConfig(family=family, output_dir=out, state_dir=state_dir, **run_config)  # the run's recipe, for its info
    components = P.build_components(family, cfg.seed)
    vae = components["vae"]
    vae.register_to_config(**state["vae_config"])
    vae.load_state_dict(state["vae"])
    modules = P._trainable(components)
    P.save_pipeline(cfg, components, modules, state["ema"], state["step"], state.get("last_eval", {}))
    return out


def resolve_base(family: str, base: str | None, work_dir: str) -> str:
    """The folder of the toy pipeline to align (see `QuickstartConfig.base`)."""
    from diffalign.toyworld.pretrain import CHECKPOINT_ROOT

    if base is None:
        path = os.path.join(CHECKPOINT_ROOT, f"toy-{family}")
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise _missing_checkpoint(family, path)
        return path
    if os.path.exists(os.path.join(base, "model_index.json")):
        return base
    if os.path.exists(os.path.join(base, "state.pt")):
        return export_state(base, work_dir, family)
    raise _missing_checkpoint(family, base)


def checkpoint_digest(path: str) -> str:
    """A short digest of a pipeline folder's weights and configs (every byte: fine-tuned policies of one base
    differ only in some tensors, which a partial read can miss)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if not name.endswith((".safetensors", ".json")):
                continue
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]
