"""Apply a kohya DoRA export the way ComfyUI and Forge do, with their own ``weight_decompose``,
and compare each layer with the exact DoRA weight (peft's and diffusers' merge).

    python scripts/check_dora_loaders.py --lora OUT.safetensors --model MODEL_DIR \\
        --comfyui /path/to/ComfyUI --forge /path/to/stable-diffusion-webui-forge

``--comfyui`` / ``--forge`` are checkouts (a work tree, or a bare git directory, read at HEAD).
Their function is read from ``comfy/weight_adapter/base.py`` / ``backend/patcher/lora.py`` and
run as it is, with only the device-cast helper it imports stood in by ``Tensor.to``. Prints, per
tool, the largest relative difference of a layer's weight and the relative difference of the
UNet's output, and whether ``dora_scale``'s shape broadcasts (a wrong shape raises or gives an
(out, out) matrix there).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import types
from pathlib import Path

import torch

TOOLS = {
    "ComfyUI": ("comfy/weight_adapter/base.py", "comfy.model_management"),
    "Forge": ("backend/patcher/lora.py", "memory_management"),
}


def _source(checkout: Path, relative: str) -> str:
    if (checkout / relative).is_file():
        return (checkout / relative).read_text()
    return subprocess.run(
        ["git", "--git-dir", str(checkout), "show", f"HEAD:{relative}"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def load_weight_decompose(checkout: Path, relative: str, helper: str):
    """The tool's ``weight_decompose`` function, compiled from its own source."""
    tree = ast.parse(_source(checkout, relative))
    node = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "weight_decompose"
    )
    node.decorator_list = []
    cast = types.SimpleNamespace(cast_to_device=lambda t, device, dtype: t.to(device, dtype))
    namespace: dict = {"torch": torch}
    root, _, leaf = helper.rpartition(".")
    if root:  # comfy.model_management -> an object "comfy" with attribute model_management
        namespace[root] = types.SimpleNamespace(**{leaf: cast})
    else:
        namespace[leaf] = cast
    exec(compile(ast.Module(body=[node], type_ignores=[]), relative, "exec"), namespace)
    return namespace["weight_decompose"]


def apply_like_tool(weight_decompose, unet, kohya: dict, lookup: dict) -> dict[str, torch.Tensor]:
    """Each DoRA layer's weight as the tool computes it (its LoRA path: mm of the flattened up
    and down, alpha / rank, then weight_decompose at strength 1)."""
    layers = dict(unet.named_modules())
    fused = {}
    for key, scale in kohya.items():
        if not key.endswith(".dora_scale"):
            continue
        name = key.removesuffix(".dora_scale")
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        alpha = float(kohya[f"{name}.alpha"]) / down.shape[0]
        weight = layers[lookup[name]].weight.detach().float().clone()
        diff = torch.mm(up.float().flatten(1), down.float().flatten(1)).reshape(weight.shape)
        fused[lookup[name]] = weight_decompose(
            scale.float(), weight, diff, alpha, 1.0, torch.float32, lambda t: t
        )
    return fused


def main() -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from naruto_lora.lora.kohya import kohya_lookup
    from naruto_lora.lora.weights import lora_target_names, read_lora
    from tests.test_export import unet_output

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path, required=True, help="a kohya DoRA file")
    parser.add_argument("--model", type=Path, required=True, help="the base model folder")
    parser.add_argument("--comfyui", type=Path)
    parser.add_argument("--forge", type=Path)
    args = parser.parse_args()

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    weights = read_lora(args.lora, unet)
    layers = dict(unet.named_modules())
    exact = {n: m.fused(layers[n].weight.detach()) for n, m in weights.modules.items()}
    kohya = load_file(str(args.lora))
    lookup = kohya_lookup(lora_target_names(unet), unet.config)

    def output_with(weights_by_layer: dict) -> torch.Tensor:
        saved = {n: layers[n].weight.data.clone() for n in weights_by_layer}
        for n, w in weights_by_layer.items():
            layers[n].weight.data = w.to(layers[n].weight.dtype)
        out = unet_output(unet)
        for n, w in saved.items():
            layers[n].weight.data = w
        return out

    reference = output_with(exact)
    growth = max(
        (exact[n].flatten(1).norm(dim=1) / layers[n].weight.detach().flatten(1).norm(dim=1) - 1)
        .abs().max().item()
        for n in exact
    )  # fmt: skip
    print(
        f"{args.lora.name}: {len(exact)} DoRA layers; largest |norm(W') / norm(W) - 1| = {growth:.2e}"
    )
    for tool, checkout in (("ComfyUI", args.comfyui), ("Forge", args.forge)):
        if checkout is None:
            continue
        relative, helper = TOOLS[tool]
        decompose = load_weight_decompose(checkout, relative, helper)
        try:
            fused = apply_like_tool(decompose, unet, kohya, lookup)
        except RuntimeError as exc:
            print(f"{tool}: fails to apply: {exc}")
            continue
        shapes_ok = all(fused[n].shape == exact[n].shape for n in exact)
        layer_error = max(
            ((fused[n] - exact[n]).abs().max() / exact[n].abs().max()).item() for n in exact
        )
        out = output_with(fused)
        output_error = ((out - reference).abs().max() / reference.abs().max()).item()
        print(
            f"{tool}: shapes {'kept' if shapes_ok else 'BROKEN'}; largest layer difference "
            f"{layer_error:.2e}, UNet output difference {output_error:.2e} (relative)"
        )
        # The pitfall the export avoids: the same magnitudes as 1-D vectors.
        flat = {k: (v.flatten() if k.endswith(".dora_scale") else v) for k, v in kohya.items()}
        try:
            broken = apply_like_tool(decompose, unet, flat, lookup)
            wrong = sum(broken[n].shape != exact[n].shape for n in exact)
            print(f"{tool} with 1-D dora_scale: {wrong} of {len(exact)} layers change shape")
        except RuntimeError as exc:
            print(f"{tool} with 1-D dora_scale: fails ({str(exc).splitlines()[0][:90]})")


if __name__ == "__main__":
    main()
