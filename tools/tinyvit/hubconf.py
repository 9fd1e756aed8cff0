"""A torch.hub repository: a tiny ViT with DINOv2's interface and parameter names.

The tests' stand-in for DINOv2 (no download, a second a run): 4 blocks of width 16, patch 4,
interpolated position embeddings, DINOv2's calls (forward_features, get_intermediate_layers,
embed_dim, patch_size) and state-dict keys.

    torch.hub.load("tools/tinyvit", "dinov2_vitt_test", source="local")
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

dependencies = ["torch"]

class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.attn_drop = nn.Linear(dim, dim * 3, bias=qkv_bias), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * self.scale @ qkv[1].transpose(-2, -1)).softmax(-1)
        x = (self.attn_drop(attn) @ qkv[2]).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

class Block(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2,
                 qkv_bias=True):
        super().__init__()
        self.patch_size, self.embed_dim, self.n_blocks = patch_size, embed_dim, depth
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        n = (img_size // patch_size) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        s = int(math.sqrt(self.pos_embed.shape[1] - 1))
        gh, gw = h // self.patch_size, w // self.patch_size
        pos = self.pos_embed[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([self.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)], 1)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + pos
    def forward_features(self, x):
        x = self.prepare_tokens(x)
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1:], "x_prenorm": x,
                "masks": None}
    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        B, _, h, w = x.shape
        x, out = self.prepare_tokens(x), []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x) if norm else x)
        out = [o[:, 1:] for o in out]
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            out = [o.reshape(B, gh, gw, -1).permute(0, 3, 1, 2) for o in out]
        return tuple(out)
    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]

def dinov2_vitt_test(pretrained=True, **kwargs):
    torch.manual_seed(0)  # deterministic "pretrained" weights
    return DinoVisionTransformer(**kwargs)
