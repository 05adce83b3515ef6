"""BaseSignature: what an adapter is checked against, as plain data (no model needed).

The engine builds one from the loaded base; validation and merging only read it. Module
names are canonical: relative to the base's backbone (`layers.0.self_attn.q_proj` for a
Llama decoder, `encoder.layer.0.attention.self.query` for BERT), so an adapter trained on
`LlamaForCausalLM`, `LlamaForSequenceClassification` or the bare `LlamaModel` maps to the
same modules.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal, Mapping

BaseKind = Literal["decoder", "encoder"]


@dataclass(frozen=True)
class BaseSignature:
    canonical_id: str  # hub id for built-ins, else the path or id the user gave
    kind: BaseKind
    backbone_prefix: str  # attribute holding the backbone in *ForCausalLM / *ForSequenceClassification
    hidden_size: int
    linear_shapes: Mapping[str, tuple[int, int]]  # canonical module name -> (in_features, out_features)
    head_module: str  # where a SEQ_CLS adapter keeps its classifier: "score" or "classifier"
    head_has_bias: bool

    @property
    def fingerprint(self) -> str:
        """Shape-based: a GGUF-converted base and its hub original fingerprint the same."""
        blob = json.dumps(
            [self.kind, self.hidden_size, sorted((k, list(v)) for k, v in self.linear_shapes.items())]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
