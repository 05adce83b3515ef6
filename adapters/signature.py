"""BaseSignature: what an adapter is checked against, as plain data (no model needed).

The engine builds one from the loaded base; validation and merging only read it. Module
names are canonical: relative to the base's backbone (`layers.0.self_attn.q_proj` for a
Llama decoder, `encoder.layer.0.attention.self.query` for BERT), so an adapter trained on
`LlamaForCausalLM`, `LlamaForSequenceClassification` or the bare `LlamaModel` maps to the
same modules. A vision base's backbone is the `*ForImageClassification`'s base model
(`mobilenet_v2`, `resnet`, `vit`...), whose adaptable layers are convolutions and linears.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Mapping, NamedTuple

BaseKind = Literal["decoder", "encoder", "vision"]


class ConvShape(NamedTuple):
    """An nn.Conv2d's geometry as a LoRA on it must match (PEFT: lora_A is a conv with the
    base's kernel, stride and padding, [r, in, kh, kw]; lora_B a 1x1 conv, [out, r, 1, 1])."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int


@dataclass(frozen=True)
class BaseSignature:
    canonical_id: str  # hub id for built-ins, else the path or id the user gave
    kind: BaseKind
    backbone_prefix: str  # attribute holding the backbone in *ForCausalLM / *ForSequenceClassification
    hidden_size: int
    linear_shapes: Mapping[str, tuple[int, int]]  # canonical module name -> (in_features, out_features)
    head_module: str  # where a SEQ_CLS adapter keeps its classifier: "score" or "classifier"
    head_has_bias: bool
    conv_shapes: Mapping[str, ConvShape] = field(default_factory=dict)  # vision bases: canonical name -> geometry
    # The head's linear inside `head_module`, when that is a container: "1" for ResNet's
    # classifier = Sequential(Flatten, Linear), whose weights are saved as `classifier.1.weight`.
    head_linear: str = ""

    @property
    def adaptable_modules(self) -> list[str]:
        """Every module a LoRA may target: linears, then convolutions."""
        return [*self.linear_shapes, *self.conv_shapes]

    @property
    def fingerprint(self) -> str:
        """Shape-based: a GGUF-converted base and its hub original fingerprint the same."""
        parts: list = [self.kind, self.hidden_size, sorted((k, list(v)) for k, v in self.linear_shapes.items())]
        if self.conv_shapes:  # text bases have none and keep the fingerprint they always had
            parts.append(sorted((k, [v.in_channels, v.out_channels, *v.kernel, v.groups])
                                for k, v in self.conv_shapes.items()))
        blob = json.dumps(parts)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
