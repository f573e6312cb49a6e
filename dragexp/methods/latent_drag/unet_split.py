"""A UNet split at its bottleneck: the encoder pass once, the decoder as often as needed.

DragNoise optimises the mid-block output for a *fixed* z_t (docs/methods.md, DragNoise 2), so the
down path, the mid block and the time/text embeddings never change during its optimisation. We run
one ordinary forward, record (with hooks) what the up path consumes, and then run only the
UNet's own up blocks and output head from any bottleneck value. This is the method's speed
advantage; only the up path below is composed here, from the UNet's own modules.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class UNetDecoder:
    """The up path of ``unet`` for a fixed (latent, t, text), as a function of one feature map.

    Args:
        start: the feature index where the decoder starts (dragexp's convention): 0 = the
            mid-block output (DragNoise's bottleneck), k = the output of ``up_blocks[k-1]``.

    Attributes:
        bottleneck: the fixed input's feature map at ``start``, the decoder's input.
    """

    @torch.no_grad()
    def __init__(self, unet: nn.Module, latent: torch.Tensor, t: int | torch.Tensor,
                 text: torch.Tensor, start: int = 0):
        from ...core.features import feature_module

        self.unet = unet
        self.start = int(start)
        n_up = len(unet.up_blocks)
        if not 0 <= self.start < n_up:
            raise ValueError(f"the optimised feature must be 0 (mid block) .. {n_up - 1} "
                             f"(up_blocks[0..{n_up - 2}]); the last block's output has no decoder "
                             f"after it, got {self.start}")
        rec: dict = {"res": []}
        hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: rec["res"].append(o))]
        for blk in unet.down_blocks:
            hooks.append(blk.register_forward_hook(lambda m, i, o: rec["res"].extend(o[1])))

        def mid_hook(module, args, kwargs, output):
            rec["emb"] = args[1] if len(args) > 1 else kwargs.get("temb")
            rec["mid"] = output

        hooks.append(unet.mid_block.register_forward_hook(mid_hook, with_kwargs=True))
        if self.start > 0:
            hooks.append(feature_module(unet, self.start).register_forward_hook(
                lambda m, i, o: rec.__setitem__("start", o)))
        # Half-precision base weights run under autocast, as every other UNet call of a
        # mixed-precision edit does; this one runs before Lightning's precision context.
        dtype = next(unet.parameters()).dtype
        autocast = torch.autocast(latent.device.type, dtype=dtype) \
            if dtype in (torch.float16, torch.bfloat16) else nullcontext()
        try:
            with autocast:
                unet(latent, t, encoder_hidden_states=text, return_dict=False)
        finally:
            for h in hooks:
                h.remove()
        self.res_samples = tuple(rec["res"])
        self.emb = rec["emb"]
        self.text = text
        self.bottleneck = rec["mid"] if self.start == 0 else rec["start"]
        # The UNet forwards an explicit upsample size when the latent is not a multiple of
        # 2 ** num_upsamplers; mirror its rule so odd sizes decode to the right shape.
        factor = 2 ** unet.num_upsamplers
        self.forward_upsample_size = any(d % factor for d in latent.shape[-2:])

    def __call__(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """eps for the recorded input with ``bottleneck`` in place of the start feature."""
        unet = self.unet
        sample = bottleneck
        res_all = self.res_samples
        for i, up in enumerate(unet.up_blocks):
            n = len(up.resnets)
            res, res_all = res_all[-n:], res_all[:-n]
            if i < self.start:
                continue
            size = res_all[-1].shape[2:] if (i < len(unet.up_blocks) - 1
                                             and self.forward_upsample_size) else None
            if getattr(up, "has_cross_attention", False):
                sample = up(hidden_states=sample, temb=self.emb, res_hidden_states_tuple=res,
                            encoder_hidden_states=self.text, upsample_size=size)
            else:
                sample = up(hidden_states=sample, temb=self.emb, res_hidden_states_tuple=res,
                            upsample_size=size)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)
