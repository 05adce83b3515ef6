"""Each merge method's delta-W against its definition, computed independently in numpy (float64)
on small matrices.

Two generation sources of different ranks and scales share module `m`; only the first has
`solo`, so every method also has to merge a module over the sources that hold it. Definitions
(PEFT's task-arithmetic rules, acting on delta-W_i = s_i * B_i @ A_i, then a truncated SVD):

- cat, and linear at its default rank sum r_i: exactly sum_i w_i delta-W_i.
- svd: that sum truncated to rank max r_i (or `rank`).
- ties: keep each delta's int(density * size) largest |entries|; elect each entry's sign from
  the sum of the trimmed deltas ("total") or of their signs ("frequency"), >= 0 meaning +;
  average the weighted trimmed entries that agree with it; truncate.
- dare_linear: keep each entry with probability density and divide by density; weighted sum.
- dare_ties: that drop, then ties' election and disjoint mean.

DARE's drop mask is the one thing taken from torch: merge.py seeds torch's global generator
with MergeSpec.seed for every module and PEFT draws one torch.bernoulli(full(density)) per
present source in order, so the reference draws the same masks and does the rest in numpy.
A second test checks DARE's structure without reproducing the generator.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from adapters.manifest import AdapterManifest
from adapters.merge import MergeSource, MergeSpec, delta_weight, merge_adapters
from adapters.package import AdapterPackage, LoraModule

OUT, IN = 7, 6
WEIGHTS = (0.7, 0.5)
SEED = 11


def package(name: str, ranks: dict[str, int], scale: float, seed: int) -> AdapterPackage:
    generator = torch.Generator().manual_seed(seed)
    modules = {module: LoraModule(a=torch.randn(r, IN, generator=generator), b=torch.randn(OUT, r, generator=generator),
                                  scale=scale)
               for module, r in ranks.items()}
    sha = hashlib.sha256(name.encode()).hexdigest()
    manifest = AdapterManifest(name=name, version=sha[:12], sha256=sha, task="generate", peft_type="LORA",
                               rank=max(ranks.values()), target_modules=tuple(ranks), size_bytes=0)
    return AdapterPackage(manifest, None, modules, None)


@pytest.fixture(scope="module")
def sources() -> list[MergeSource]:
    first = package("first", {"m": 2, "solo": 3}, scale=1.5, seed=1)
    second = package("second", {"m": 3}, scale=0.5, seed=2)
    return [MergeSource(first, WEIGHTS[0]), MergeSource(second, WEIGHTS[1])]


# --- the definitions, in numpy -----------------------------------------------------------------


def np_delta(module: LoraModule) -> np.ndarray:
    return module.scale * (module.b.double().numpy() @ module.a.double().numpy())


def present(sources: list[MergeSource], module: str) -> tuple[list[np.ndarray], np.ndarray]:
    held = [s for s in sources if module in s.package.modules]
    return [np_delta(s.package.modules[module]) for s in held], np.array([s.weight for s in held])


def truncate(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def trim(delta: np.ndarray, density: float) -> np.ndarray:
    keep = np.argsort(-np.abs(delta), axis=None)[: int(density * delta.size)]
    trimmed = np.zeros_like(delta)
    trimmed.flat[keep] = delta.flat[keep]
    return trimmed


def dare_drop(deltas: list[np.ndarray], density: float, seed: int) -> list[np.ndarray]:
    torch.manual_seed(seed)
    masks = [torch.bernoulli(torch.full(d.shape, density)).double().numpy() for d in deltas]
    return [d * mask / density for d, mask in zip(deltas, masks)]


def elect_and_average(deltas: list[np.ndarray], weights: np.ndarray, majority: str) -> np.ndarray:
    stack = np.stack(deltas)  # [sources, out, in]
    votes = stack.sum(0) if majority == "total" else np.sign(stack).sum(0)
    sign = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(stack) == sign
    return (weights[:, None, None] * stack * agree).sum(0) / np.maximum(agree.sum(0), 1)


def reference(sources: list[MergeSource], module: str, method: str, density: float | None, majority: str,
              rank: int | None) -> np.ndarray:
    deltas, weights = present(sources, module)
    ranks = [s.package.modules[module].rank for s in sources if module in s.package.modules]
    if method in ("cat", "linear", "svd"):
        merged = sum(w * d for w, d in zip(weights, deltas))
    elif method == "ties":
        merged = elect_and_average([trim(d, density) for d in deltas], weights, majority)
    elif method == "dare_linear":
        merged = sum(w * d for w, d in zip(weights, dare_drop(deltas, density, SEED)))
    else:
        merged = elect_and_average(dare_drop(deltas, density, SEED), weights, majority)
    if method == "cat":
        return merged
    default = sum(ranks) if method == "linear" else max(ranks)
    return truncate(merged, min(rank or default, OUT, IN))


def exact(sources: list[MergeSource], module: str) -> np.ndarray:
    deltas, weights = present(sources, module)
    return sum(w * d for w, d in zip(weights, deltas))


# --- the merges against them -------------------------------------------------------------------

CASES = [  # method, density, majority sign, rank
    ("cat", None, "total", None),
    ("linear", None, "total", None),  # default rank sum r_i = 5: exact
    ("linear", None, "total", 2),
    ("svd", None, "total", None),  # default rank max r_i = 3
    ("ties", 0.5, "total", IN),  # full rank: the ties delta itself
    ("ties", 0.3, "frequency", IN),
    ("ties", 0.5, "total", None),  # then truncated to max r_i
    ("dare_linear", 0.5, "total", IN),
    ("dare_linear", 0.7, "total", None),
    ("dare_ties", 0.5, "total", IN),
    ("dare_ties", 0.4, "frequency", None),
]


@pytest.mark.parametrize("method, density, majority, rank", CASES)
def test_merged_delta_w_equals_the_definition(sources, method, density, majority, rank):
    spec = MergeSpec(method, density=density, rank=rank, majority_sign=majority, seed=SEED)
    result = merge_adapters("mix", sources, spec)
    assert set(result.package.modules) == {"m", "solo"}
    num = den = 0.0
    for module in ("m", "solo"):
        expected = reference(sources, module, method, density, majority, rank)
        got = delta_weight(result.package.modules[module]).double().numpy()
        scale = np.abs(expected).max()
        assert scale > 0.1, "a definition that is all zeros proves nothing"
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale, err_msg=f"{method} {module}")
        num += float(((expected - exact(sources, module)) ** 2).sum())
        den += float((exact(sources, module) ** 2).sum())
    assert result.relative_error == pytest.approx(np.sqrt(num / den), rel=1e-4, abs=1e-6)


def test_cat_keeps_every_rank_and_linear_stays_exact(sources):
    cat = merge_adapters("mix", sources, MergeSpec("cat")).package
    assert cat.modules["m"].rank == 2 + 3  # solo is padded to the same r with zeros
    assert merge_adapters("mix", sources, MergeSpec("linear")).relative_error < 1e-6
    assert merge_adapters("mix", sources, MergeSpec("svd")).relative_error > 0.01  # rank 3 < 5 loses something


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_a_density_fraction_and_rescales_the_rest(method):
    """Without reproducing the generator: one source at full rank, so delta-W is the dropped
    delta itself. Every entry is 0 or w * delta / density, and the kept fraction is density
    within 4 binomial standard deviations; another seed drops other entries."""
    out, inp, density, weight = 20, 30, 0.3, 0.8
    generator = torch.Generator().manual_seed(5)
    module = LoraModule(a=torch.randn(30, inp, generator=generator), b=torch.randn(out, 30, generator=generator),
                        scale=1.0)
    sha = hashlib.sha256(b"big").hexdigest()
    manifest = AdapterManifest(name="big", version=sha[:12], sha256=sha, task="generate", peft_type="LORA",
                               rank=30, target_modules=("m",), size_bytes=0)
    source = [MergeSource(AdapterPackage(manifest, None, {"m": module}, None), weight)]
    delta = np_delta(module)
    kept_masks = []
    for seed in (1, 2):
        merged = merge_adapters("d", source, MergeSpec(method, density=density, rank=out, seed=seed))
        got = delta_weight(merged.package.modules["m"]).double().numpy()
        kept = np.abs(got) > 1e-4 * np.abs(delta).max()
        np.testing.assert_allclose(got[kept], weight * delta[kept] / density, rtol=1e-4)
        np.testing.assert_allclose(got[~kept], 0.0, atol=1e-4 * np.abs(delta).max())
        n = delta.size
        assert abs(kept.sum() - density * n) < 4 * np.sqrt(n * density * (1 - density)), kept.sum()
        kept_masks.append(kept)
    assert (kept_masks[0] != kept_masks[1]).any()
