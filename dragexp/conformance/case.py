"""A conformance case folder: its description, inputs and models (../shared/conformance/README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


class CaseError(RuntimeError):
    """A case folder that cannot be run (missing file, unknown kind, malformed entry)."""


@dataclass
class Case:
    """One case folder. ``inputs`` are loaded eagerly; ``expected`` only by the judge."""

    path: Path
    meta: dict
    inputs: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> "Case":
        path = Path(path)
        cj = path / "case.json"
        if not cj.is_file():
            raise CaseError(f"{path}: no case.json")
        meta = json.loads(cj.read_text())
        if "kind" not in meta:
            raise CaseError(f"{cj}: no 'kind'")
        inp = path / "inputs.safetensors"
        inputs = load_file(str(inp)) if inp.is_file() else {}
        return cls(path, meta, inputs)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def param(self, name: str, default=None):
        """A parameter: the 0-d/1-d input tensor of that name, else ``case.json`` parameters."""
        if name in self.inputs:
            t = self.inputs[name]
            return t.item() if t.dim() == 0 else t.tolist()
        p = self.meta.get("parameters", {}).get(name)
        if p is not None:
            return p.get("value") if isinstance(p, dict) and "value" in p else p
        if default is not None:
            return default
        raise CaseError(f"{self.path}: parameter {name!r} is neither an input nor in case.json")

    def expected_keys(self) -> list[str]:
        """The keys listed under ``expected`` in case.json (patterns left as written)."""
        return list(self.meta.get("expected", {}).keys())

    def build_unet(self, filename: str = "unet.safetensors", config: dict | None = None):
        """The case's UNet by the README's one rule: from_config, float32, strict load.

        Keys containing ``.processor.`` (image-prompt projections) are returned separately.
        """
        from diffusers import UNet2DConditionModel

        if config is None:
            config = self.meta.get("unet", {}).get("diffusers_config")
        if config is None:
            raise CaseError(f"{self.path}: no UNet config for {filename}")
        f = self.path / filename
        if not f.is_file():
            raise CaseError(f"{self.path}: missing {filename}")
        unet = UNet2DConditionModel.from_config(config).float()
        sd = {k: v.float() for k, v in load_file(str(f)).items()}
        extra = {k: v for k, v in sd.items() if ".processor." in k}
        unet.load_state_dict({k: v for k, v in sd.items() if ".processor." not in k}, strict=True)
        unet.eval().requires_grad_(False)
        return unet, extra
