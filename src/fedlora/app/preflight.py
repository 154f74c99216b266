"""The checks of a config that need neither data nor model, run before either loads.

Building the method on a stand-in layer checks its name, options and rank rules in about a
second, where the full preparation (transformers, the data, the model) takes many; the real
build in ``prepare`` repeats them on the real layers.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.config import Config, ConfigError


def preflight(cfg: Config) -> None:
    """Raise the method's one-line error for ``cfg`` now, if it has one; a missing data file's; a tracker's that is not installed."""
    source = Path(cfg.data.source).expanduser()
    if ("/" in cfg.data.source or source.suffix) and not source.exists():  # a path, not a corpus name: before the imports of many seconds
        raise ConfigError(f"data.source: file not found: {source} (accepted: a built-in corpus name, or a .json/.jsonl/.csv/.parquet file or saved dataset folder)")
    from fedlora.app.trackers import check_installed
    from fedlora.methods import Setup, build_method

    check_installed(cfg.output.trackers)

    ranks = cfg.client_ranks()
    widest = max([*ranks, *(r for p in cfg.client_rank_patterns().values() for r in p.values())])
    if widest > 4096:  # no real layer is this narrow to refuse it later; stand-ins this wide would cost memory
        return
    layers = {f"stand_in.{m}": (widest, widest) for m in cfg.lora.target_modules}
    setup = Setup(
        layers=layers,
        ranks=dict(enumerate(ranks)),
        scales=dict(enumerate(cfg.client_scales())),
        seed=cfg.seed,
        options=cfg.federation.options,
        rank_patterns=cfg.client_rank_patterns(),
    )
    method = build_method(cfg.federation.method, setup)
    from fedlora.federation.seam import check_wrappers
    from fedlora.federation.privacy import privacy_wrappers
    from fedlora.federation.wrappers import build_wrappers

    check_wrappers(method, build_wrappers(cfg.federation.wrappers) + privacy_wrappers(cfg))
