"""A torch.hub repository: a small ViT with DINOv2's interface and state-dict keys.

    torch.hub.load("tools/tinyvit", "dinov2_vitt_test", source="local")   # the tests' model
    torch.hub.load(HUB, "dinov2_vitt8_tin", source="local")                # the miniature's

`dinov2_vitt_test`: 4 blocks of width 16, patch 4, deterministic weights; a second a run, for tests.
`dinov2_vitt8_tin`: ViT-Tiny/8 (width 192, 6 blocks, 3 heads, 64 px), DINOv2's architecture (class
token, LayerScale, interpolated position embeddings); tools/pretrain_backbone.py pretrains it on
Tiny-ImageNet-200 and writes a copy of this folder with its weights, dinov2_vitt8_tin.pth.
Calls: forward_features, get_intermediate_layers, embed_dim, patch_size, as DINOv2's.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

dependencies = ["torch"]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=qkv_bias), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                 mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.n_blocks, self.num_register_tokens = depth, 0
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # DINOv2's; never used here
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        s = int(math.sqrt(self.pos_embed.shape[1] - 1))
        gh, gw = h // self.patch_size, w // self.patch_size
        pos = self.pos_embed[:, 1:]
        if (gh, gw) != (s, s):  # another input size: the position embedding interpolated
            pos = pos.reshape(1, s, s, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        pos = torch.cat([self.pos_embed[:, :1], pos], 1)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + pos

    def forward_features(self, x):
        x = self.prepare_tokens(x)
        for b in self.blocks:
            x = b(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:1],
                "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x, "masks": None}

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        B, _, h, w = x.shape
        x, out = self.prepare_tokens(x), []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x) if norm else x)
        cls, out = [o[:, 0] for o in out], [o[:, 1:] for o in out]
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            out = [o.reshape(B, gh, gw, -1).permute(0, 3, 1, 2) for o in out]
        return tuple(zip(out, cls)) if return_class_token else tuple(out)

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


def dinov2_vitt_test(pretrained=True, **kwargs):
    torch.manual_seed(0)  # deterministic "pretrained" weights
    return DinoVisionTransformer(**{"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 4,
                                    "num_heads": 2, "mlp_ratio": 2.0, **kwargs})


def dinov2_vitt8_tin(pretrained=True, weights=None, **kwargs):
    """ViT-Tiny/8; pretrained: the weights file (default: dinov2_vitt8_tin.pth beside this file)."""
    model = DinoVisionTransformer(**kwargs)
    if pretrained:
        path = weights or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "dinov2_vitt8_tin.pth")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model
