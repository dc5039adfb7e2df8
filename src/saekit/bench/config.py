"""Options of ``saekit bench`` (one :class:`BenchConfig`: flags, JSON and docs) and sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from saekit.options import Options, option


@dataclass
class BenchSize:
    """Problem size and budget of one bench run (per seed)."""

    n_features: int
    d: int
    tokens: int
    batch_size: int
    eval_tokens: int
    signed_tokens: int
    block_size: int = 4096
    lr: float = 4e-3  # one Adam lr for every variant (tuned for TopK on this data)


SIZES: dict[str, BenchSize] = {
    # for tests and smoke runs only: too short to rank rules
    "tiny": BenchSize(64, 24, 16_384, 512, 4096, 8192, block_size=2048),
    "small": BenchSize(256, 64, 1_500_000, 512, 32_768, 400_000),
    "large": BenchSize(1024, 128, 4_000_000, 1024, 131_072, 1_000_000, lr=2e-3),
}


def _rules() -> list[str]:
    from saekit.rules import rule_names

    return rule_names()


def _sizes() -> list[str]:
    return list(SIZES)


@dataclass
class BenchConfig(Options):
    """What ``saekit bench`` trains, on how much data, over which seeds."""

    size: str = option(
        "small",
        "problem size: small (256 features in d=64, a few CPU-minutes per seed), large, or"
        " tiny (smoke test only)",
        choices=_sizes,
    )
    seeds: list[int] = option(
        [0, 1, 2],
        "seeds; each trains every variant on its own data (data seed = seed + 1000) and the"
        " table shows mean ± sd over them",
        nonempty=True,
    )
    rules: list[str] = option([], "rules to run (default: every registered rule)", choices=_rules)
    aux_variants: list[str] = option(
        ["topk+zipf"],
        "extra variants RULE+AUX: RULE trained with the aux loss AUX (when RULE runs)",
    )
    arch_variants: list[str] = option(
        ["batchtopk+matryoshka"],
        "extra variants RULE+PART: RULE with the architecture part PART (saekit.arch, its"
        " default options), when RULE runs; the Matryoshka row's absorption is the one to"
        " compare with plain BatchTopK",
    )
    grids: dict = option(
        {},
        "per rule, the values of its sparsity option to try instead of the rule's own grid,"
        ' e.g. {"relu": [3, 5]}',
    )
    signed: bool = option(
        True, "also compare signed_rules on bidirectional features (when all of them run)"
    )
    signed_rules: list[str] = option(
        ["topk", "abstopk"], "rules compared on bidirectional (signed) features", choices=_rules
    )
    tokens: int = option(0, "training tokens per seed (0: the size's)", ge=0)
    signed_tokens: int = option(0, "training tokens of the signed comparison (0: the size's)", ge=0)
    eval_tokens: int = option(0, "held-out evaluation tokens per SAE (0: the size's)", ge=0)
    out: str = option("runs/bench", "output directory: bench.json, bench.png, runs/")
    threads: int = option(1, "torch CPU threads (0: torch's default)", ge=0)
    progress: bool = option(False, "show training progress bars", switch=True)
    quiet: bool = option(False, "no progress lines while it runs", switch=True)
    keep_runs: bool = option(True, "keep the trained run directories under OUT/runs")
    saelens: dict = option(
        {},
        "train on a SAELens synthetic model instead (needs sae-lens), e.g."
        ' {"model": "synthsaebench-16k", "overrides": {"num_features": 1024, "hidden_dim":'
        " 128}}; widths follow the model; see saekit.sources.saelens_synthetic",
        flag="saelens-synthetic",
    )

    def sized(self) -> BenchSize:
        """The size with ``tokens`` / ``signed_tokens`` / ``eval_tokens`` overrides applied."""
        s = SIZES[self.size]
        return dataclasses.replace(
            s,
            tokens=self.tokens or s.tokens,
            signed_tokens=self.signed_tokens or s.signed_tokens,
            eval_tokens=self.eval_tokens or s.eval_tokens,
        )
